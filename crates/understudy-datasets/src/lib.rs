//! From recorded calls to datasets. For now: the OpenAI chat fine-tuning JSONL
//! format that `understudy import`, `calls export` and the replay provider share.

pub mod jsonl;
