//! A folder with an `understudy.toml`, and the `understudy` binary run in it
//! as a user would run it. Shared by the CLI test files.

#![allow(dead_code)] // Each test file uses its own part.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::thread::JoinHandle;

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

    /// Starts `understudy serve` on an ephemeral port (debug logs on stderr).
    /// Returns the child, its base URL, and a thread that keeps reading its
    /// log, so the server never blocks on a full pipe, and returns all of it
    /// once the server exits.
    pub fn serve(&self) -> (Child, String, JoinHandle<String>) {
        let mut child = self
            .command()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("UNDERSTUDY_LOG", "debug")
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn serve");
        let mut reader = BufReader::new(child.stderr.take().expect("stderr"));
        let mut first_lines = String::new();
        let base_url = loop {
            let mut line = String::new();
            assert!(reader.read_line(&mut line).expect("read") > 0, "serve exited early: {first_lines}");
            first_lines.push_str(&line);
            if let Some(url) = line.trim().strip_prefix("understudy gateway listening on ") {
                break url.to_string();
            }
        };
        let log = std::thread::spawn(move || {
            let mut text = first_lines;
            for line in reader.lines().map_while(Result::ok) {
                text.push_str(&line);
                text.push('\n');
            }
            text
        });
        (child, base_url, log)
    }
}
