//! The pages: each handler reads the store through the loop's functions and
//! renders one template.

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Form;
use minijinja::context;
use serde::Deserialize;
use serde_json::{json, Value};
use time::macros::format_description;
use understudy_datasets::jsonl::{prompt_text, ChatExample};
use understudy_gateway::auth::{bearer, Caller};
use understudy_gateway::{AppState, GatewayError};
use understudy_loop::{LoopError, PromoteRequest};
use understudy_store::{CallFilter, CallOrder, StatusFilter, StoreError};
use understudy_types::{CallRecord, OffsetDateTime, ServedBy};

use crate::view::render;

/// The cookie that holds the key a browser signed in with.
const KEY_COOKIE: &str = "understudy_key";
/// Calls on one page of the list.
const PAGE_SIZE: u64 = 50;
/// The call list counts matches up to this many.
const COUNT_CAP: u64 = 1_000;
/// A text search without a start day reads at most this many newest calls.
const TEXT_SCAN: u64 = 100_000;

/// Why a page is not shown.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    #[error("sign in with a gateway key")]
    SignIn,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Refused(String),
    #[error("the store could not answer: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Loop(#[from] LoopError),
    #[error("a page did not render: {0}")]
    Template(#[from] minijinja::Error),
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let status = match &self {
            PageError::SignIn => return Redirect::to("/ui/login").into_response(),
            PageError::Forbidden(_) => StatusCode::FORBIDDEN,
            PageError::NotFound(_) => StatusCode::NOT_FOUND,
            PageError::BadRequest(_) => StatusCode::BAD_REQUEST,
            PageError::Refused(_) => StatusCode::CONFLICT,
            PageError::Loop(LoopError::Refused(_) | LoopError::NotFound(_)) => StatusCode::CONFLICT,
            PageError::Store(_) | PageError::Loop(_) | PageError::Template(_) => {
                tracing::error!(error = %self, "dashboard page failed");
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        let message = self.to_string();
        let page = render("error.html", context! { status => status.as_u16(), message })
            .unwrap_or_else(|_| format!("{status}: {message}"));
        (status, Html(page)).into_response()
    }
}

/// Who is looking: a signed-in key, or anyone when auth is off.
pub struct Viewer {
    caller: Caller,
}

impl Viewer {
    fn is_admin(&self) -> bool {
        self.caller.is_admin()
    }

    fn name(&self) -> String {
        self.caller.key.as_ref().map_or_else(|| "local".to_string(), |key| key.name.clone())
    }

    fn require_admin(&self, what: &str) -> Result<(), PageError> {
        if self.is_admin() {
            return Ok(());
        }
        Err(PageError::Forbidden(format!("{what} needs an admin key; `{}` is not one.", self.name())))
    }

    fn context(&self) -> Value {
        json!({"name": self.name(), "admin": self.is_admin(), "signed_in": self.caller.key.is_some()})
    }
}

fn cookie<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .find_map(|value| value.split(';').find_map(|pair| pair.trim().strip_prefix(name)?.strip_prefix('=')))
}

impl FromRequestParts<AppState> for Viewer {
    type Rejection = PageError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Viewer, PageError> {
        let secret = bearer(parts).or_else(|| cookie(parts, KEY_COOKIE));
        match state.caller(secret).await {
            Ok(caller) => Ok(Viewer { caller }),
            Err(GatewayError::Store(message)) => Err(PageError::Refused(message)),
            Err(_) => Err(PageError::SignIn),
        }
    }
}

fn format_time(at: OffsetDateTime) -> String {
    at.format(format_description!("[year]-[month]-[day] [hour]:[minute]:[second]")).unwrap_or_default()
}

/// `/ui`: every task's ledger and route.
pub async fn overview(State(state): State<AppState>, viewer: Viewer) -> Result<Html<String>, PageError> {
    let store = state.recorder().store();
    let ledger = understudy_loop::ledger(store, &CallFilter::default(), state.config().machine_price().1).await?;
    let figures = ledger.to_json();
    let tasks: Vec<Value> = state
        .config()
        .tasks
        .keys()
        .map(|task| {
            let totals = figures["tasks"].as_array().and_then(|all| all.iter().find(|row| row["task"] == **task));
            json!({"name": task, "status": state.task_status(task), "totals": totals})
        })
        .collect();
    let page =
        render("overview.html", context! { viewer => viewer.context(), tasks, ledger => figures, page => "overview" })?;
    Ok(Html(page))
}

#[derive(Deserialize, Default)]
pub struct Notice {
    done: Option<String>,
}

/// `/ui/tasks/NAME`: route, audits, history, versions and the buttons.
pub async fn task(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(task): Path<String>,
    Query(notice): Query<Notice>,
) -> Result<Html<String>, PageError> {
    let config = state.config();
    let Some(task_config) = config.tasks.get(&task) else {
        return Err(PageError::NotFound(format!("no task `{task}` in the config")));
    };
    let store = state.recorder().store();
    let filter = CallFilter { task: Some(task.clone()), ..CallFilter::default() };
    let ledger = understudy_loop::ledger(store, &filter, config.machine_price().1).await?.to_json();
    let history: Vec<Value> = understudy_loop::history(store, &task)
        .await?
        .into_iter()
        .rev()
        .map(|entry| {
            json!({"at": format_time(entry.at), "by": entry.by, "what": entry.what, "why": entry.why,
                   "policy": entry.policy.as_ref().map(|(policy, _)| policy),
                   "understudy": entry.policy.as_ref().and_then(|(_, understudy)| understudy.clone())})
        })
        .collect();
    // The change before the current one, which "roll back" restores.
    let previous = history.iter().filter(|entry| entry["policy"].is_string()).nth(1).cloned();
    let versions: Vec<Value> = store
        .list_model_versions(&task)
        .await?
        .into_iter()
        .map(|version| {
            let calibration = understudy_loop::Calibration::read(&version.path);
            json!({"id": version.id, "created_at": format_time(version.created_at), "method": version.method,
                   "base": version.base_model, "dataset": version.dataset_id, "train_seconds": version.wall_seconds,
                   "certified_threshold": calibration.certified_threshold(),
                   "report": understudy_loop::Calibration::report(&version.path)})
        })
        .collect();
    let (stage, _) = understudy_loop::autopilot::current_stage(store, &task).await?;
    let drift = drift_signals(store, &task, task_config).await;
    let page = render(
        "task.html",
        context! {
            viewer => viewer.context(), page => "task", task => task, status => state.task_status(&task),
            target => task_config.target_agreement, audit_rate => task_config.audit_rate,
            autopilot => task_config.autopilot.is_some(), stage => stage.as_str(),
            ledger, history, previous, versions, drift, done => notice.done,
        },
    )?;
    Ok(Html(page))
}

/// The drift watch's signals over the task's newest calls, as the
/// autopilot tests them (its window and level, or `report drift`'s
/// defaults). No encoder is loaded for a page, so input drift is not tested
/// here; `understudy report drift` tests it.
async fn drift_signals(store: &understudy_store::Store, task: &str, config: &understudy_config::TaskConfig) -> Value {
    let (window, alpha) = config
        .autopilot
        .as_ref()
        .map_or((DRIFT_WINDOW, DRIFT_ALPHA), |autopilot| (autopilot.drift_window, autopilot.drift_alpha));
    let drift = match understudy_loop::task_drift(store, task, window, alpha, None).await {
        Ok(drift) => drift,
        Err(error) => return json!({"window": window, "alpha": alpha, "error": error.to_string()}),
    };
    let signal = |name: &str, test: Option<(bool, f64)>| {
        test.map(|(drifted, p_value)| json!({"signal": name, "drifted": drifted, "p_value": p_value}))
    };
    let report = &drift.report;
    let signals: Vec<Value> = [
        signal("input", report.input.as_ref().map(|test| (test.drifted, test.p_value))),
        signal("answers", report.answers.as_ref().map(|test| (test.drifted, test.p_value))),
        signal("confidence", report.confidence.as_ref().map(|test| (test.drifted, test.p_value))),
    ]
    .into_iter()
    .flatten()
    .collect();
    json!({"window": window, "alpha": alpha, "signals": signals, "skipped": drift.skipped,
           "understudy": drift.understudy})
}

/// `understudy report drift`'s defaults, for a task without an autopilot.
const DRIFT_WINDOW: u64 = 200;
const DRIFT_ALPHA: f64 = 0.01;

#[derive(Deserialize)]
pub struct PromoteForm {
    policy: String,
    #[serde(default)]
    model: String,
}

/// A promotion from a button: the same `promote` the CLI runs, so a
/// cascade needs a certified threshold here too. It is a change by hand:
/// it pins an autopiloted task.
pub async fn promote(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(task): Path<String>,
    Form(form): Form<PromoteForm>,
) -> Result<Response, PageError> {
    viewer.require_admin("Promoting")?;
    let request = PromoteRequest {
        task: task.clone(),
        policy: form.policy.trim().to_string(),
        model: Some(form.model.trim().to_string()).filter(|model| !model.is_empty()),
        threshold: None,
        note: Some(format!("dashboard: by {}", viewer.name())),
    };
    let promotion = understudy_loop::promote(state.config(), state.recorder().store(), &request).await?;
    let done = format!("policy {} from now on", promotion.change.policy);
    let target = format!("/ui/tasks/{}?done={}", percent_encode(&task), percent_encode(&done));
    Ok(Redirect::to(&target).into_response())
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (byte as char).to_string(),
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// The call list's filters, as the form sends them (empty means any).
#[derive(Deserialize, Default, Clone)]
pub struct CallsQuery {
    #[serde(default)]
    task: String,
    #[serde(default)]
    model: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    served_by: String,
    /// `YYYY-MM-DD`, from the start of that day (UTC).
    #[serde(default)]
    since: String,
    /// `YYYY-MM-DD`, to the end of that day (UTC).
    #[serde(default)]
    until: String,
    #[serde(default)]
    q: String,
    #[serde(default)]
    page: u64,
}

impl CallsQuery {
    fn filter(&self) -> Result<CallFilter, PageError> {
        let some = |text: &str| Some(text.trim().to_string()).filter(|text| !text.is_empty());
        let day = |text: &str, name: &str| -> Result<Option<OffsetDateTime>, PageError> {
            let Some(text) = some(text) else { return Ok(None) };
            time::Date::parse(&text, format_description!("[year]-[month]-[day]"))
                .map(|date| Some(date.midnight().assume_utc()))
                .map_err(|_| PageError::BadRequest(format!("{name} `{text}` is not a day like 2026-12-01")))
        };
        let status = match self.status.trim() {
            "" => None,
            "ok" => Some(StatusFilter::Ok),
            "error" => Some(StatusFilter::Error),
            code => Some(StatusFilter::Code(code.parse().map_err(|_| {
                PageError::BadRequest(format!("status `{code}` is not ok, error or an HTTP status code"))
            })?)),
        };
        let served_by = match self.served_by.trim() {
            "" => None,
            "lead" => Some(ServedBy::Lead),
            "understudy" => Some(ServedBy::Understudy),
            other => return Err(PageError::BadRequest(format!("served by `{other}` is not lead or understudy"))),
        };
        Ok(CallFilter {
            task: some(&self.task),
            model: some(&self.model),
            since: day(&self.since, "since")?,
            until: day(&self.until, "until")?.map(|at| at + time::Duration::days(1)),
            status,
            served_by,
            text: some(&self.q),
            ..CallFilter::default()
        })
    }

    /// The query string of these filters on another page.
    fn on_page(&self, page: u64) -> String {
        let pairs = [
            ("task", &self.task),
            ("model", &self.model),
            ("status", &self.status),
            ("served_by", &self.served_by),
            ("since", &self.since),
            ("until", &self.until),
            ("q", &self.q),
        ];
        let mut query: Vec<String> = pairs
            .iter()
            .filter(|(_, value)| !value.trim().is_empty())
            .map(|(key, value)| format!("{key}={}", percent_encode(value.trim())))
            .collect();
        if page > 0 {
            query.push(format!("page={page}"));
        }
        query.join("&")
    }
}

fn call_row(call: &CallRecord) -> Value {
    let example = ChatExample::from_call(call);
    let prompt = example.as_ref().map(|example| prompt_text(&example.prompt)).unwrap_or_default();
    let answer = example.as_ref().map(ChatExample::answer_text).unwrap_or_default();
    let routing = call.routing.as_ref();
    json!({
        "id": call.id.to_string(), "at": format_time(call.created_at), "task": call.task, "model": call.model,
        "status": call.status, "error": call.error,
        "served_by": routing.map_or("lead", |routing| routing.served_by.as_str()),
        "policy": routing.map(|routing| routing.policy.clone()),
        "fallback_reason": routing.and_then(|routing| routing.fallback_reason.clone()),
        "prompt_tokens": call.usage.prompt_tokens, "completion_tokens": call.usage.completion_tokens,
        "cost": call.cost.dollars(), "latency_ms": call.latency_ms,
        "prompt": prompt, "answer": answer,
    })
}

/// `/ui/calls`: the filtered list, newest first, a page at a time.
pub async fn calls(
    State(state): State<AppState>,
    viewer: Viewer,
    Query(query): Query<CallsQuery>,
) -> Result<Html<String>, PageError> {
    viewer.require_admin("The call list")?;
    let store = state.recorder().store();
    let mut filter = query.filter()?;
    // Text is matched by reading each call: without a start day, only the
    // newest TEXT_SCAN calls (of the other filters) are searched, so the
    // page stays fast on a large store.
    let mut searched_from = None;
    if filter.text.is_some() && filter.since.is_none() {
        let without_text = CallFilter { text: None, ..filter.clone() };
        searched_from = store.nth_newest_call_time(&without_text, TEXT_SCAN).await?;
        filter.since = searched_from;
    }
    // Counted no further than COUNT_CAP, so that a page of a store of ten
    // million calls never counts them all.
    let n_calls = store.count_calls_up_to(&filter, COUNT_CAP).await?;
    filter.limit = Some(PAGE_SIZE + 1);
    filter.offset = Some(query.page * PAGE_SIZE);
    filter.order = CallOrder::NewestFirst;
    let mut listed = store.list_calls(&filter).await?;
    let more = listed.len() as u64 > PAGE_SIZE;
    listed.truncate(PAGE_SIZE as usize);
    let rows: Vec<Value> = listed.iter().map(call_row).collect();
    let page = render(
        "calls.html",
        context! {
            viewer => viewer.context(), page => "calls", rows, n_calls, capped => n_calls >= COUNT_CAP,
            searched_from => searched_from.map(format_time), text_scan => TEXT_SCAN,
            current => query.page,
            filters => json!({"task": query.task, "model": query.model, "status": query.status,
                              "served_by": query.served_by, "since": query.since, "until": query.until, "q": query.q}),
            tasks => state.config().tasks.keys().collect::<Vec<_>>(),
            previous => (query.page > 0).then(|| query.on_page(query.page - 1)),
            next => more.then(|| query.on_page(query.page + 1)),
            export => query.on_page(0),
        },
    )?;
    Ok(Html(page))
}

/// `/ui/calls/export.jsonl`: the filtered calls as fine-tuning lines,
/// exactly as `understudy calls export` writes them.
pub async fn export(
    State(state): State<AppState>,
    viewer: Viewer,
    Query(query): Query<CallsQuery>,
) -> Result<Response, PageError> {
    viewer.require_admin("Exporting calls")?;
    let (lines, _n) = understudy_loop::export_calls(state.recorder().store(), &query.filter()?).await?;
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson")),
            (header::CONTENT_DISPOSITION, HeaderValue::from_static("attachment; filename=\"calls.jsonl\"")),
        ],
        lines,
    )
        .into_response())
}

/// `/ui/calls/ID`: one call, whole.
pub async fn call(
    State(state): State<AppState>,
    viewer: Viewer,
    Path(id): Path<String>,
) -> Result<Html<String>, PageError> {
    viewer.require_admin("A call's page")?;
    let found = state.recorder().store().get_call(&id).await?;
    let [call] = found.as_slice() else {
        return Err(PageError::NotFound(format!("no call with id `{id}`")));
    };
    let pretty = |text: &str| {
        serde_json::from_str::<Value>(text)
            .ok()
            .and_then(|value| serde_json::to_string_pretty(&value).ok())
            .unwrap_or_else(|| text.to_string())
    };
    let routing = call.routing.as_ref();
    let page = render(
        "call.html",
        context! {
            viewer => viewer.context(), page => "calls", call => call_row(call),
            provider => call.provider, endpoint => call.endpoint.as_str(), stream => call.stream,
            request => pretty(&call.request), response => call.response.as_deref().map(pretty),
            understudy => routing.map(|routing| json!({
                "model": routing.understudy_model, "answer": routing.understudy_answer,
                "confidence": routing.understudy_confidence, "agreement": routing.agreement,
                "cost": routing.understudy_cost.dollars(), "audit_answer": routing.audit_answer,
                "audit_agreement": routing.audit_agreement,
            })),
        },
    )?;
    Ok(Html(page))
}

/// `/ui/keys`: every key, its budget and what it spent this period.
pub async fn keys(State(state): State<AppState>, viewer: Viewer) -> Result<Html<String>, PageError> {
    viewer.require_admin("The key list")?;
    let store = state.recorder().store();
    let now = OffsetDateTime::now_utc();
    let mut rows = Vec::new();
    for key in store.list_keys().await? {
        let spent = match key.budget {
            Some(budget) => Some(store.key_spend_since(&key.id, budget.period.start_of(now)).await?.dollars()),
            None => None,
        };
        rows.push(json!({
            "name": key.name, "id": key.id, "admin": key.admin,
            "status": match key.unusable_at(now) { None => "active", Some(_) => "revoked or expired" },
            "budget": key.budget.map(|budget| budget.usd), "period": key.budget.map(|budget| budget.period.as_str()),
            "spent": spent,
            "used": match (spent, key.budget) { (Some(spent), Some(budget)) if budget.usd > 0.0 => Some(spent / budget.usd), _ => None },
        }));
    }
    let page = render("keys.html", context! { viewer => viewer.context(), page => "keys", rows })?;
    Ok(Html(page))
}

#[derive(Deserialize, Default)]
pub struct SignIn {
    #[serde(default)]
    key: String,
}

pub async fn login_form() -> Result<Html<String>, PageError> {
    Ok(Html(render("login.html", context! { page => "login" })?))
}

/// Signs a browser in: the key is checked as any request's would be, then
/// kept in a cookie only this site's pages send back.
pub async fn login(State(state): State<AppState>, Form(form): Form<SignIn>) -> Result<Response, PageError> {
    let key = form.key.trim();
    match state.caller(Some(key)).await {
        Ok(_) => {
            let cookie = format!("{KEY_COOKIE}={key}; Path=/ui; HttpOnly; SameSite=Strict");
            let mut response = Redirect::to("/ui").into_response();
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, value);
            }
            Ok(response)
        }
        Err(error) => {
            let page = render("login.html", context! { page => "login", error => error.to_string() })?;
            Ok((StatusCode::UNAUTHORIZED, Html(page)).into_response())
        }
    }
}

pub async fn logout() -> Response {
    let mut response = Redirect::to("/ui/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("understudy_key=; Path=/ui; Max-Age=0; HttpOnly; SameSite=Strict"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_and_bad_ones_are_named() {
        let query = CallsQuery {
            task: "trec".into(),
            status: "error".into(),
            served_by: "understudy".into(),
            since: "2026-12-01".into(),
            until: "2026-12-01".into(),
            q: " lake ".into(),
            ..CallsQuery::default()
        };
        let filter = query.filter().expect("filter");
        assert_eq!(filter.task.as_deref(), Some("trec"));
        assert_eq!(filter.status, Some(StatusFilter::Error));
        assert_eq!(filter.served_by, Some(ServedBy::Understudy));
        assert_eq!(filter.text.as_deref(), Some("lake"));
        let (since, until) = (filter.since.expect("since"), filter.until.expect("until"));
        assert_eq!(until - since, time::Duration::days(1), "until takes in the whole day");
        assert_eq!(
            query.on_page(2),
            "task=trec&status=error&served_by=understudy&since=2026-12-01&until=2026-12-01&q=lake&page=2"
        );

        for (bad, named) in [
            (CallsQuery { status: "fine".into(), ..CallsQuery::default() }, "status `fine`"),
            (CallsQuery { served_by: "robot".into(), ..CallsQuery::default() }, "served by `robot`"),
            (CallsQuery { since: "yesterday".into(), ..CallsQuery::default() }, "since `yesterday`"),
        ] {
            let error = bad.filter().err().expect("refused").to_string();
            assert!(error.contains(named), "{error}");
        }
    }

    #[test]
    fn text_is_percent_encoded_for_links() {
        assert_eq!(percent_encode("policy cascade:0.9 & more"), "policy%20cascade%3A0.9%20%26%20more");
    }
}
