//! Recorded calls out as fine-tuning JSONL: `understudy calls export` and the
//! dashboard's export write the same lines.

use understudy_datasets::jsonl::ChatExample;
use understudy_store::{CallFilter, StatusFilter, Store};

use crate::error::Result;

/// The successful chat calls `filter` selects (any status when the filter
/// names one), one JSONL line each with its newest verdict, and how many.
pub async fn export_calls(store: &Store, filter: &CallFilter) -> Result<(String, usize)> {
    let mut filter = filter.clone();
    filter.status.get_or_insert(StatusFilter::Ok);
    let calls = store.list_calls(&filter).await?;
    let ids: Vec<_> = calls.iter().map(|call| call.id).collect();
    let feedback = store.latest_feedback(&ids).await?;
    let mut lines = String::new();
    let mut n_exported = 0;
    for call in &calls {
        if let Some(example) = ChatExample::from_call(call) {
            lines.push_str(&example.with_feedback(feedback.get(&call.id)).to_line());
            lines.push('\n');
            n_exported += 1;
        }
    }
    Ok((lines, n_exported))
}
