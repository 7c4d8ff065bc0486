//! The dashboard: web pages at `/ui` on the gateway's own port, over the
//! same store, keys and ledger as the CLI.
//!
//! - Overview (`/ui`): per task, the ledger (`understudy_loop::ledger`, the
//!   figures `report savings --json` prints) with its daily plots.
//! - Task (`/ui/tasks/NAME`): the live route and audits (`/healthz`'s
//!   [`AppState::task_status`]), the autopilot's stage, the history
//!   (`understudy_loop::history`), model versions with their certificates,
//!   and promote/roll-back buttons (`understudy_loop::promote`).
//! - Calls (`/ui/calls`): a filtered, paginated list, one call's page, and
//!   the filtered set as JSONL (`understudy_loop::export_calls`).
//! - Keys (`/ui/keys`): spend against budget per key.
//!
//! Who may look: with keys on, a browser signs in once with a gateway key
//! (kept in an HttpOnly, SameSite=Strict cookie; a bearer header works too).
//! Any valid key sees the overview and the task pages; calls, keys and the
//! buttons need an admin key. Without auth (loopback only), everyone is an
//! admin, as for `/healthz`. Pages are server-side templates (minijinja) and
//! plots are uPlot; both are embedded in the binary, so nothing is fetched
//! at run time.

mod assets;
mod pages;
mod view;

use axum::routing::{get, post};
use axum::Router;
use understudy_gateway::AppState;

/// The dashboard's routes, to merge into the gateway's
/// (`understudy_gateway::serve_with`).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(pages::overview))
        .route("/ui/", get(pages::overview))
        .route("/ui/login", get(pages::login_form).post(pages::login))
        .route("/ui/logout", post(pages::logout))
        .route("/ui/tasks/{task}", get(pages::task))
        .route("/ui/tasks/{task}/promote", post(pages::promote))
        .route("/ui/calls", get(pages::calls))
        .route("/ui/calls/export.jsonl", get(pages::export))
        .route("/ui/calls/{id}", get(pages::call))
        .route("/ui/keys", get(pages::keys))
        .route("/ui/assets/{file}", get(assets::asset))
}
