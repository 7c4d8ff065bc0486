//! `understudy feedback`: a user's verdict on a recorded call's answer.
//!
//! The dataset build reads the latest verdict on each call (see
//! `understudy_datasets::build::eligible_calls`).

use std::path::Path;

use serde_json::json;
use understudy_types::{Feedback, FeedbackScore, OffsetDateTime, Uuid};

use crate::cli::FeedbackCommand;
use crate::output::{load_config, open_store};

pub async fn run(config_path: &Path, command: FeedbackCommand) -> anyhow::Result<()> {
    let score = FeedbackScore::parse(&command.score).ok_or_else(|| {
        anyhow::anyhow!("--score `{}` is not a score: use positive or negative (or up/down, 1/-1)", command.score)
    })?;
    let config = load_config(config_path)?;
    let store = open_store(&config).await?;
    let result = async {
        let found = store.get_call(&command.call).await?;
        let call = match found.as_slice() {
            [call] => call,
            [] => anyhow::bail!("no call with id `{}`", command.call),
            _ => anyhow::bail!("`{}` is the prefix of more than one call id; give more of it", command.call),
        };
        let feedback = Feedback {
            id: Uuid::now_v7(),
            call_id: call.id,
            score,
            comment: command.comment.clone(),
            created_at: OffsetDateTime::now_utc(),
        };
        store.add_feedback(&feedback).await?;
        Ok((feedback, call.task.clone()))
    }
    .await;
    store.close().await;
    let (feedback, task) = result?;
    if command.json {
        println!(
            "{}",
            json!({
                "call_id": feedback.call_id.to_string(),
                "task": task,
                "score": feedback.score.as_str(),
                "comment": feedback.comment,
            })
        );
    } else {
        let task = task.map_or_else(|| "no task".to_string(), |task| format!("task `{task}`"));
        println!("call {} ({task}) rated {}", feedback.call_id, feedback.score.as_str());
    }
    Ok(())
}
