//! A folder with an `understudy.toml`, and the `understudy` binary run in it
//! as a user would run it. Shared by the CLI test files.

#![allow(dead_code)] // Each test file uses its own part.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

pub struct Workdir {
    pub dir: tempfile::TempDir,
    envs: Vec<(String, String)>,
}

impl Workdir {
    /// A temporary folder holding `config` as `understudy.toml` and an empty
    /// `recorded.jsonl` for a replay provider.
    pub fn with_config(config: &str) -> Workdir {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("understudy.toml"), config).expect("config");
        std::fs::write(dir.path().join("recorded.jsonl"), "").expect("replay file");
        Workdir { dir, envs: Vec::new() }
    }

    /// Sets an environment variable for every command run here.
    pub fn env(mut self, key: &str, value: &str) -> Workdir {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn command(&self) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_understudy"));
        command.current_dir(self.dir.path()).env_remove("UNDERSTUDY_CONFIG");
        for (key, value) in &self.envs {
            command.env(key, value);
        }
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command().args(args).output().expect("run understudy")
    }

    pub fn run_ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(output.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).expect("utf-8")
    }

    pub fn run_json(&self, args: &[&str]) -> Value {
        serde_json::from_str(self.run_ok(args).trim()).expect("json output")
    }

    /// Runs a command that must fail, and returns its standard error.
    pub fn run_err(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(!output.status.success(), "{args:?} succeeded: {}", String::from_utf8_lossy(&output.stdout));
        String::from_utf8(output.stderr).expect("utf-8")
    }

    pub fn write_lines(&self, name: &str, lines: &[Value]) {
        let text: String = lines.iter().map(|line| format!("{line}\n")).collect();
        std::fs::write(self.path(name), text).expect("write jsonl");
    }
}
