//! A task's story, oldest first: its policy changes (by hand, by the
//! autopilot, by the guardrail) and the autopilot's transitions, each with its
//! reason. `understudy history` and the dashboard's task page show this.

use serde_json::Value;
use understudy_store::Store;
use understudy_types::OffsetDateTime;

use crate::autopilot::{AUTOPILOT_NOTE, GUARDRAIL_NOTE};
use crate::error::Result;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A row of `policy_changes`.
    Policy,
    /// A row of `autopilot_events`.
    Autopilot,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Policy => "policy",
            EntryKind::Autopilot => "autopilot",
        }
    }
}

/// One entry of a task's history.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    pub at: OffsetDateTime,
    pub id: String,
    pub kind: EntryKind,
    /// `by hand`, `autopilot` or `guardrail`.
    pub by: &'static str,
    /// `policy cascade:0.9 with mv-…`, or `shadow → cascade`.
    pub what: String,
    pub why: String,
    /// The autopilot's evidence (JSON), `Null` for policy changes.
    pub evidence: Value,
    /// For a policy change: its policy and understudy.
    pub policy: Option<(String, Option<String>)>,
}

/// Who made a policy change, by its note's prefix: the one rule.
pub fn changed_by(note: &str) -> &'static str {
    if note.starts_with(AUTOPILOT_NOTE) {
        "autopilot"
    } else if note.starts_with(GUARDRAIL_NOTE) {
        "guardrail"
    } else {
        "by hand"
    }
}

/// `task`'s policy changes and autopilot transitions, oldest first.
pub async fn history(store: &Store, task: &str) -> Result<Vec<HistoryEntry>> {
    let changes = store.policy_history(task).await?;
    let events = store.autopilot_history(task).await?;
    let mut entries = Vec::with_capacity(changes.len() + events.len());
    for change in changes {
        let why = change.note.clone().unwrap_or_default();
        let what = match &change.understudy {
            Some(understudy) => format!("policy {} with {understudy}", change.policy),
            None => format!("policy {}", change.policy),
        };
        entries.push(HistoryEntry {
            at: change.created_at,
            id: change.id.clone(),
            kind: EntryKind::Policy,
            by: changed_by(&why),
            what,
            why,
            evidence: Value::Null,
            policy: Some((change.policy.clone(), change.understudy.clone())),
        });
    }
    for event in events {
        entries.push(HistoryEntry {
            at: event.created_at,
            id: event.id.clone(),
            kind: EntryKind::Autopilot,
            by: "autopilot",
            what: format!("{} → {}", event.stage_from, event.stage_to),
            why: event.reason.clone(),
            evidence: serde_json::from_str(&event.evidence).unwrap_or(Value::Null),
            policy: None,
        });
    }
    entries.sort_by(|a, b| (a.at, &a.id).cmp(&(b.at, &b.id)));
    Ok(entries)
}
