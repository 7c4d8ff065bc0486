//! Recorded calls as datasets: the JSONL format shared with import and
//! export, and the dataset build (filters, scrubbing, de-duplication, kind
//! detection, time split) with its files.

pub mod build;
pub mod dedup;
pub mod files;
pub mod jsonl;
pub mod kind;
pub mod responses;
pub mod scrub;
pub mod split;
