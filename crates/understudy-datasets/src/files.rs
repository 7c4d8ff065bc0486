//! A dataset version on disk: `<datasets_dir>/<id>/` holds `train.jsonl`,
//! `validation.jsonl` and `test.jsonl` (OpenAI's chat fine-tuning format, one
//! example a line, oldest first) and `manifest.json`.
//!
//! A version is immutable: once its folder exists it is never rewritten. The
//! files are written into a temporary folder that is renamed into place, so a
//! reader never sees half a version.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::build::{BuiltDataset, Manifest, SPLIT_NAMES};

pub const MANIFEST_FILE: &str = "manifest.json";

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("cannot write dataset files in {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a dataset manifest: {source}")]
    Manifest { path: PathBuf, source: serde_json::Error },
    #[error("unknown split `{0}` (known: train, validation, test, all)")]
    UnknownSplit(String),
}

/// The file a split's rows are in.
pub fn split_file(dataset_dir: &Path, split: &str) -> PathBuf {
    dataset_dir.join(format!("{split}.jsonl"))
}

/// Writes a version's files into `<datasets_dir>/<id>/` unless that folder
/// holds a manifest already (the same id is the same content). Returns the
/// version's folder and whether it was written now.
pub fn write_dataset(datasets_dir: &Path, dataset: &BuiltDataset) -> Result<(PathBuf, bool), FilesError> {
    let final_dir = datasets_dir.join(&dataset.manifest.id);
    if final_dir.join(MANIFEST_FILE).is_file() {
        return Ok((final_dir, false));
    }
    let staging_dir = datasets_dir.join(format!(".{}.partial-{}", dataset.manifest.id, std::process::id()));
    let write_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| FilesError::Write { path, source }
    };
    std::fs::create_dir_all(&staging_dir).map_err(write_error(&staging_dir))?;
    for split in SPLIT_NAMES {
        let path = split_file(&staging_dir, split);
        let mut text = String::new();
        for example in dataset.split(split) {
            text.push_str(&example.to_line());
            text.push('\n');
        }
        write_synced(&path, text.as_bytes()).map_err(write_error(&path))?;
    }
    let manifest_path = staging_dir.join(MANIFEST_FILE);
    let manifest_text = serde_json::to_string_pretty(&dataset.manifest)
        .map_err(|error| FilesError::Write { path: manifest_path.clone(), source: std::io::Error::other(error) })?;
    write_synced(&manifest_path, format!("{manifest_text}\n").as_bytes()).map_err(write_error(&manifest_path))?;
    // A folder left by a build that died before its manifest was written is
    // incomplete; ours replaces it.
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(write_error(&final_dir))?;
    }
    std::fs::rename(&staging_dir, &final_dir).map_err(write_error(&final_dir))?;
    Ok((final_dir, true))
}

pub fn read_manifest(dataset_dir: &Path) -> Result<Manifest, FilesError> {
    let path = dataset_dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| FilesError::Read { path: path.clone(), source })?;
    serde_json::from_str(&text).map_err(|source| FilesError::Manifest { path, source })
}

/// The JSONL text of one split, or of all three in order (`all`).
pub fn read_split(dataset_dir: &Path, split: &str) -> Result<String, FilesError> {
    let splits: Vec<&str> = match split {
        "all" => SPLIT_NAMES.to_vec(),
        name if SPLIT_NAMES.contains(&name) => vec![name],
        other => return Err(FilesError::UnknownSplit(other.to_string())),
    };
    let mut text = String::new();
    for split in splits {
        let path = split_file(dataset_dir, split);
        text.push_str(&std::fs::read_to_string(&path).map_err(|source| FilesError::Read { path, source })?);
    }
    Ok(text)
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{build_dataset, BuildConfig, BuildInput};
    use crate::jsonl::ChatExample;

    #[test]
    fn a_version_is_written_once_and_reads_back() {
        let line = |idx: usize| {
            format!(
                r#"{{"messages":[{{"role":"user","content":"question number {idx}"}},{{"role":"assistant","content":"answer {idx}"}}],"created_at":"2026-10-01T00:00:{idx:02}Z"}}"#
            )
        };
        let examples: Vec<ChatExample> =
            (0..10).map(|idx| ChatExample::parse(&line(idx)).expect("line parses")).collect();
        let built = build_dataset(BuildInput {
            task: "t".into(),
            examples,
            n_unreadable: 0,
            feedback: Default::default(),
            config: BuildConfig::default(),
            built_at: time::OffsetDateTime::UNIX_EPOCH,
        })
        .expect("builds");
        let dir = tempfile::tempdir().expect("tempdir");
        let (dataset_dir, written) = write_dataset(dir.path(), &built).expect("writes");
        assert!(written);
        assert_eq!(dataset_dir, dir.path().join(&built.manifest.id));
        assert_eq!(read_manifest(&dataset_dir).expect("manifest"), built.manifest);
        assert_eq!(read_split(&dataset_dir, "test").expect("test"), format!("{}\n{}\n", line(8), line(9)));
        let all = read_split(&dataset_dir, "all").expect("all");
        assert_eq!(all, (0..10).map(|idx| format!("{}\n", line(idx))).collect::<String>());
        assert!(matches!(read_split(&dataset_dir, "dev"), Err(FilesError::UnknownSplit(_))));

        let (_, written_again) = write_dataset(dir.path(), &built).expect("second write");
        assert!(!written_again, "an existing version is not rewritten");
        let entries = std::fs::read_dir(dir.path()).expect("list").count();
        assert_eq!(entries, 1, "no staging folder is left behind");
    }
}
