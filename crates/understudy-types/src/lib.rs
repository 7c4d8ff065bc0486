//! Domain types shared by every stage of Understudy.
//!
//! These carry no wire format: the gateway owns OpenAI JSON, the store owns
//! SQL rows, and the config crate owns TOML. This crate does no IO.

pub mod tensor_names;

/// The tracing target of a call's span and of its upstream attempts'
/// spans: the gateway exports this target, and only it, as OpenTelemetry
/// traces (`[telemetry]`).
pub const CALL_SPAN_TARGET: &str = "understudy::call";

/// The form two answers are compared in: trimmed, lower-cased, single
/// spaces. The one rule for agreement between the understudy and the lead,
/// shared by the gateway (cascade validity, shadow and audit agreement),
/// `eval` and the ledger.
pub fn normalize_answer(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// The text a body (a request, an answer, an upstream's error) is kept and
/// recorded as: the body itself when it is UTF-8, else the body with each
/// invalid sequence replaced by U+FFFD. Valid UTF-8 is checked a word at a
/// time; `String::from_utf8_lossy` walks it byte by byte.
pub fn text_of_body(body: &[u8]) -> String {
    match std::str::from_utf8(body) {
        Ok(text) => text.to_owned(),
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    }
}

/// Whether two answers agree under [`normalize_answer`].
pub fn answers_agree(left: &str, right: &str) -> bool {
    normalize_answer(left) == normalize_answer(right)
}

use std::fmt;

pub use time::{Duration, OffsetDateTime};
pub use uuid::Uuid;

/// Token counts of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
}

/// Where a call's token counts came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageSource {
    /// The provider reported `usage` itself.
    Provider,
    /// The provider gave none, so the gateway counted the tokens.
    Counted,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Provider => "provider",
            UsageSource::Counted => "counted",
        }
    }

    pub fn parse(text: &str) -> Option<UsageSource> {
        match text {
            "provider" => Some(UsageSource::Provider),
            "counted" => Some(UsageSource::Counted),
            _ => None,
        }
    }
}

/// An amount of money in US dollars.
///
/// Prices are published per million tokens with a few decimals, and one call
/// costs fractions of a cent, so an `f64` keeps every figure we show exact to
/// far more places than a report prints.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default)]
pub struct Money(pub f64);

impl Money {
    pub fn dollars(self) -> f64 {
        self.0
    }
}

impl std::ops::Add for Money {
    type Output = Money;
    fn add(self, other: Money) -> Money {
        Money(self.0 + other.0)
    }
}

impl std::iter::Sum for Money {
    fn sum<I: Iterator<Item = Money>>(iter: I) -> Money {
        Money(iter.map(|money| money.0).sum())
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "${:.6}", self.0)
    }
}

/// The one rule for what a local model's compute costs.
///
/// `machine_price_per_hour` is the price of the whole machine (all its
/// cores), as a team rents or depreciates it. A call or a training run costs
/// the machine time it takes: `seconds` of wall time when it has the whole
/// machine ([`machine_time_cost`]: a call the gateway serves, a training
/// run), or its CPU-seconds shared over the machine's cores when CPU time is
/// what was measured ([`cpu_time_cost`]: `eval`, `plan`, `bench/engine`). A
/// CPU-second is one core for one second, so on a 2-core machine it is half a
/// machine-second: pricing it as a whole machine-second would charge a call
/// once per core.
pub fn machine_time_cost(seconds: f64, machine_price_per_hour: f64) -> Money {
    Money(seconds * machine_price_per_hour / 3600.0)
}

/// What `cpu_seconds` of CPU time cost on this machine at
/// `machine_price_per_hour`: the machine time they take, with the machine's
/// [`machine_cores`] sharing it (see [`machine_time_cost`]).
pub fn cpu_time_cost(cpu_seconds: f64, machine_price_per_hour: f64) -> Money {
    machine_time_cost(cpu_seconds / machine_cores() as f64, machine_price_per_hour)
}

/// The cores this process may run on (the CPU affinity and cgroup quota
/// count, as `std::thread::available_parallelism` reads them), at least 1.
pub fn machine_cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get))
}

/// A model's price per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Price {
    pub input_per_million: f64,
    pub output_per_million: f64,
}

impl Price {
    pub fn cost(&self, usage: Usage) -> Money {
        Money(
            (usage.prompt_tokens as f64 * self.input_per_million
                + usage.completion_tokens as f64 * self.output_per_million)
                / 1_000_000.0,
        )
    }
}

/// The API surface a call went through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Embeddings,
    /// OpenAI's legacy text completions (`/v1/completions`).
    Completions,
    /// OpenAI's Responses API (`/v1/responses`): a conversation like chat,
    /// in another shape.
    Responses,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Completions => "completions",
            Endpoint::Responses => "responses",
        }
    }

    pub fn parse(text: &str) -> Option<Endpoint> {
        match text {
            "chat" => Some(Endpoint::ChatCompletions),
            "embeddings" => Some(Endpoint::Embeddings),
            "completions" => Some(Endpoint::Completions),
            "responses" => Some(Endpoint::Responses),
            _ => None,
        }
    }

    /// A conversation (messages in, an assistant message out): what a task's
    /// understudy can answer and a dataset's rows are made of.
    pub fn is_conversation(self) -> bool {
        matches!(self, Endpoint::ChatCompletions | Endpoint::Responses)
    }
}

/// What a task's answers look like, which decides how an understudy learns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskKind {
    /// The answers take a small set of values (a classifier can learn it).
    Label,
    /// Anything else: the understudy has to write the answer.
    Generation,
}

impl TaskKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Label => "label",
            TaskKind::Generation => "generation",
        }
    }

    pub fn parse(text: &str) -> Option<TaskKind> {
        match text {
            "label" => Some(TaskKind::Label),
            "generation" => Some(TaskKind::Generation),
            _ => None,
        }
    }
}

/// One recorded call: what was asked, what came back, and what it cost.
///
/// `request` and `response` hold the JSON bodies as text, exactly as they
/// crossed the wire (a streamed response is assembled into one body).
#[derive(Debug, Clone, PartialEq)]
pub struct CallRecord {
    pub id: Uuid,
    pub created_at: OffsetDateTime,
    pub task: Option<String>,
    pub model: String,
    pub provider: String,
    pub endpoint: Endpoint,
    pub stream: bool,
    pub request: String,
    pub response: Option<String>,
    pub usage: Usage,
    pub usage_source: UsageSource,
    pub latency_ms: f64,
    pub ttft_ms: Option<f64>,
    pub status: u16,
    pub error: Option<String>,
    /// What the call cost in all: the lead's tokens when the lead was asked,
    /// plus the understudy's compute when it was.
    pub cost: Money,
    /// How a task's call was routed; `None` for calls that named a model
    /// directly and for calls recorded before routing existed.
    pub routing: Option<Routing>,
    /// The gateway key the call was made with: its id and name, never the
    /// key itself. `None` when the gateway runs without keys (`auth =
    /// "none"`) and for imported calls.
    pub key: Option<KeyRef>,
    /// The upstream's id for the call (its `x-request-id` answer header, or
    /// Anthropic's `request-id`), to trace a call with the provider; `None`
    /// when no HTTP upstream answered (a local model, a replay, an error
    /// before the upstream).
    pub upstream_request_id: Option<String>,
}

/// Which gateway key made a call.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyRef {
    pub id: String,
    pub name: String,
}

/// The period a key's budget is counted over, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetPeriod {
    Day,
    Month,
}

impl BudgetPeriod {
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetPeriod::Day => "day",
            BudgetPeriod::Month => "month",
        }
    }

    pub fn parse(text: &str) -> Option<BudgetPeriod> {
        match text {
            "day" => Some(BudgetPeriod::Day),
            "month" => Some(BudgetPeriod::Month),
            _ => None,
        }
    }

    /// The start of the period holding `at`: midnight UTC of its day, or of
    /// the first day of its month.
    pub fn start_of(self, at: OffsetDateTime) -> OffsetDateTime {
        let at = at.to_offset(time::UtcOffset::UTC);
        let date = match self {
            BudgetPeriod::Day => at.date(),
            BudgetPeriod::Month => at.date().replace_day(1).unwrap_or(at.date()),
        };
        date.midnight().assume_utc()
    }

    /// The start of the period after the one holding `at`.
    pub fn end_of(self, at: OffsetDateTime) -> OffsetDateTime {
        let start = self.start_of(at);
        match self {
            BudgetPeriod::Day => start + time::Duration::days(1),
            BudgetPeriod::Month => {
                let (year, month) = (start.year(), start.month());
                let (year, month) = if month == time::Month::December {
                    (year + 1, time::Month::January)
                } else {
                    (year, month.next())
                };
                time::Date::from_calendar_date(year, month, 1)
                    .map(|date| date.midnight().assume_utc())
                    .unwrap_or(start + time::Duration::days(31))
            }
        }
    }
}

/// A spending limit in US dollars per period.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    pub usd: f64,
    pub period: BudgetPeriod,
}

/// A key clients of the gateway authenticate with. The store keeps its
/// SHA-256 hash and a short prefix (to tell keys apart in a list), never
/// the key: it is shown once, when it is created.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayKey {
    /// A UUIDv7: ids sort by creation time.
    pub id: String,
    pub name: String,
    /// The key's first characters (`us-` and a few more), for lists.
    pub prefix: String,
    /// Lower-case hex SHA-256 of the whole key.
    pub hash: String,
    /// The tasks the key may call (`task:NAME`); `None` with `models` also
    /// `None` means every task and model.
    pub tasks: Option<Vec<String>>,
    /// The models the key may call by name.
    pub models: Option<Vec<String>>,
    pub budget: Option<Budget>,
    /// Requests per minute.
    pub rpm: Option<u64>,
    /// Tokens per minute (prompt tokens plus the answer's `max_tokens`).
    pub tpm: Option<u64>,
    pub expires_at: Option<OffsetDateTime>,
    /// May rate any call, read `/metrics` and `/healthz` details.
    pub admin: bool,
    pub created_at: OffsetDateTime,
    pub revoked_at: Option<OffsetDateTime>,
}

impl GatewayKey {
    /// Whether a call to `task` (or, without a task, to `model` by name)
    /// is within the key's scope.
    pub fn may_call(&self, task: Option<&str>, model: &str) -> bool {
        if self.tasks.is_none() && self.models.is_none() {
            return true;
        }
        let listed = |list: &Option<Vec<String>>, name: &str| {
            list.as_ref().is_some_and(|list| list.iter().any(|item| item == name))
        };
        match task {
            Some(task) => listed(&self.tasks, task),
            None => listed(&self.models, model),
        }
    }

    /// Why the key cannot be used at `now`, if it cannot.
    pub fn unusable_at(&self, now: OffsetDateTime) -> Option<KeyUnusable> {
        if self.revoked_at.is_some() {
            return Some(KeyUnusable::Revoked);
        }
        match self.expires_at {
            Some(expires_at) if expires_at <= now => Some(KeyUnusable::Expired(expires_at)),
            _ => None,
        }
    }

    pub fn key_ref(&self) -> KeyRef {
        KeyRef { id: self.id.clone(), name: self.name.clone() }
    }
}

/// Why a known key is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyUnusable {
    Revoked,
    Expired(OffsetDateTime),
}

/// Who answered the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ServedBy {
    #[default]
    Lead,
    Understudy,
}

impl ServedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            ServedBy::Lead => "lead",
            ServedBy::Understudy => "understudy",
        }
    }

    pub fn parse(text: &str) -> Option<ServedBy> {
        match text {
            "lead" => Some(ServedBy::Lead),
            "understudy" => Some(ServedBy::Understudy),
            _ => None,
        }
    }
}

/// A user's verdict on a call's answer. The latest verdict on a call counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedbackScore {
    Positive,
    Negative,
}

impl FeedbackScore {
    pub fn as_str(self) -> &'static str {
        match self {
            FeedbackScore::Positive => "positive",
            FeedbackScore::Negative => "negative",
        }
    }

    /// `positive`/`negative`, and the usual spellings of a thumb
    /// (`up`/`down`, `good`/`bad`, `+1`/`-1`, `1`), case-insensitive.
    pub fn parse(text: &str) -> Option<FeedbackScore> {
        match text.trim().to_ascii_lowercase().as_str() {
            "positive" | "pos" | "up" | "thumbs_up" | "thumbs-up" | "thumbsup" | "good" | "+1" | "1" => {
                Some(FeedbackScore::Positive)
            }
            "negative" | "neg" | "down" | "thumbs_down" | "thumbs-down" | "thumbsdown" | "bad" | "-1" => {
                Some(FeedbackScore::Negative)
            }
            _ => None,
        }
    }

    /// `1` or `-1`, as the store keeps it.
    pub fn as_i64(self) -> i64 {
        match self {
            FeedbackScore::Positive => 1,
            FeedbackScore::Negative => -1,
        }
    }

    pub fn from_i64(value: i64) -> Option<FeedbackScore> {
        match value {
            1 => Some(FeedbackScore::Positive),
            -1 => Some(FeedbackScore::Negative),
            _ => None,
        }
    }
}

/// One piece of feedback on a recorded call.
#[derive(Debug, Clone, PartialEq)]
pub struct Feedback {
    /// UUIDv7: feedback given in the same millisecond still has an order.
    pub id: Uuid,
    pub call_id: Uuid,
    pub score: FeedbackScore,
    pub comment: Option<String>,
    pub created_at: OffsetDateTime,
}

/// How a task's call went between its lead and its understudy.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Routing {
    /// The task's policy when the call came in (`cascade:0.93`, `shadow`, ...).
    pub policy: String,
    pub served_by: ServedBy,
    /// Why the lead served a call the understudy was asked first
    /// (`low_confidence`, `understudy_error`, `understudy_timeout`, `invalid_answer`).
    pub fallback_reason: Option<String>,
    /// The understudy asked, if one was.
    pub understudy_model: Option<String>,
    /// The understudy's answer text (also when the lead served).
    pub understudy_answer: Option<String>,
    pub understudy_confidence: Option<f64>,
    pub understudy_latency_ms: Option<f64>,
    /// The understudy's compute: its measured time at the machine's price.
    pub understudy_cost: Money,
    /// Whether the two answers agree, when both were produced.
    pub agreement: Option<bool>,
    /// What the lead would have cost for the calls the understudy served.
    pub lead_cost_avoided: Money,
    /// For an audited call (the understudy served, and the lead was asked
    /// too, in the background): the lead's answer, never served.
    pub audit_answer: Option<String>,
    /// Whether the served answer agrees with the audit's; `None` when the
    /// call was not audited or the lead failed to answer.
    pub audit_agreement: Option<bool>,
    /// What the audit's lead call cost (part of the call's `cost`).
    pub audit_cost: Money,
}

impl CallRecord {
    /// A record id that sorts by creation time (UUIDv7).
    pub fn new_id() -> Uuid {
        Uuid::now_v7()
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status) && self.error.is_none()
    }

    /// What the lead was paid for this call: its cost less the understudy's
    /// compute (the same rule as the savings ledger's `lead_cost`).
    pub fn lead_cost(&self) -> Money {
        Money(self.cost.dollars() - self.routing.as_ref().map_or(0.0, |routing| routing.understudy_cost.dollars()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn answers_compare_without_case_or_spacing() {
        assert!(super::answers_agree("  DESC \n", "desc"));
        assert!(!super::answers_agree("DESC", "DES C"));
    }

    #[test]
    fn a_cpu_second_is_one_core_of_the_machine_for_a_second() {
        let cores = super::machine_cores() as f64;
        assert!(cores >= 1.0);
        // An hour of the whole machine costs its price per hour ...
        assert!((super::machine_time_cost(3600.0, 0.10).dollars() - 0.10).abs() < 1e-12);
        // ... and so does an hour of every core at once.
        assert!((super::cpu_time_cost(3600.0 * cores, 0.10).dollars() - 0.10).abs() < 1e-12);
        assert!((super::cpu_time_cost(1.0, 0.10).dollars() - 0.10 / 3600.0 / cores).abs() < 1e-15);
    }

    #[test]
    fn a_body_is_kept_as_its_text_and_invalid_bytes_become_replacement_characters() {
        assert_eq!(super::text_of_body("{\"a\":\"é\u{0}\"}".as_bytes()), "{\"a\":\"é\u{0}\"}");
        assert_eq!(super::text_of_body(b"ok \xff\xfe then \xe2\x82"), "ok \u{fffd}\u{fffd} then \u{fffd}");
        assert_eq!(super::text_of_body(b""), "");
    }

    use super::*;

    #[test]
    fn price_cost_is_per_million_tokens() {
        let price = Price { input_per_million: 0.15, output_per_million: 0.60 };
        let cost = price.cost(Usage { prompt_tokens: 1_000_000, completion_tokens: 500_000 });
        assert!((cost.dollars() - 0.45).abs() < 1e-12);
    }

    #[test]
    fn a_key_calls_what_its_scope_lists_or_everything_without_one() {
        let key = |tasks: Option<&[&str]>, models: Option<&[&str]>| GatewayKey {
            id: "k".into(),
            name: "k".into(),
            prefix: "us-".into(),
            hash: String::new(),
            tasks: tasks.map(|list| list.iter().map(|item| item.to_string()).collect()),
            models: models.map(|list| list.iter().map(|item| item.to_string()).collect()),
            budget: None,
            rpm: None,
            tpm: None,
            expires_at: None,
            admin: false,
            created_at: OffsetDateTime::UNIX_EPOCH,
            revoked_at: None,
        };
        let open = key(None, None);
        assert!(open.may_call(Some("triage"), "gpt-4o") && open.may_call(None, "gpt-4o"));
        let tasks = key(Some(&["triage"]), None);
        assert!(tasks.may_call(Some("triage"), "gpt-4o"));
        assert!(!tasks.may_call(Some("summary"), "gpt-4o") && !tasks.may_call(None, "gpt-4o"));
        let models = key(None, Some(&["gpt-4o"]));
        assert!(models.may_call(None, "gpt-4o") && !models.may_call(None, "o4-mini"));
        assert!(!models.may_call(Some("triage"), "gpt-4o"), "a task is not a model");

        let now = time::macros::datetime!(2026-12-01 12:00 UTC);
        assert_eq!(open.unusable_at(now), None);
        let expired = GatewayKey { expires_at: Some(now), ..open.clone() };
        assert_eq!(expired.unusable_at(now), Some(KeyUnusable::Expired(now)));
        let revoked = GatewayKey { revoked_at: Some(now), ..expired };
        assert_eq!(revoked.unusable_at(now), Some(KeyUnusable::Revoked));
    }

    #[test]
    fn budget_periods_are_utc_days_and_calendar_months() {
        use time::macros::datetime;
        let at = datetime!(2026-12-31 23:30 -02:00);
        assert_eq!(BudgetPeriod::Day.start_of(at), datetime!(2027-01-01 00:00 UTC));
        assert_eq!(BudgetPeriod::Day.end_of(at), datetime!(2027-01-02 00:00 UTC));
        let at = datetime!(2026-12-15 08:00 UTC);
        assert_eq!(BudgetPeriod::Month.start_of(at), datetime!(2026-12-01 00:00 UTC));
        assert_eq!(BudgetPeriod::Month.end_of(at), datetime!(2027-01-01 00:00 UTC));
        assert_eq!(BudgetPeriod::Month.end_of(datetime!(2027-02-10 00:00 UTC)), datetime!(2027-03-01 00:00 UTC));
    }

    #[test]
    fn ids_sort_by_time() {
        let first = CallRecord::new_id();
        let second = CallRecord::new_id();
        assert!(first < second);
    }
}
