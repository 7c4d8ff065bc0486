//! The process's tracing: log lines on stderr, and, when `[telemetry]` names
//! an OTLP endpoint, one span per call exported to it.
//!
//! A call's span (target [`CALL_TARGET`], see `draft::CallDraft`) carries the
//! task, the model, the provider, the route (policy, who served, why it fell
//! back), the status, the tokens and the cost; each upstream attempt is a
//! child span (the providers' `upstream` spans). The spans are off unless
//! traces are exported: their target is enabled only then, so a gateway
//! without `[telemetry]` pays one cached "disabled" check per call.
//!
//! The subscriber is built once, with or without the exporting layer: the
//! binary reads `serve`'s config before it installs it. (A layer swapped in
//! later, through `tracing_subscriber::reload`, would put a lock and a
//! per-layer filter on every callsite's check for the process's lifetime.)

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::{Layer as _, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry};
use understudy_config::TelemetryConfig;

/// The target of calls' spans and of their upstream attempts.
pub use understudy_types::CALL_SPAN_TARGET as CALL_TARGET;

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("the OTLP exporter for {endpoint} cannot start: {message}")]
    Exporter { endpoint: String, message: String },
}

/// Installs the process's subscriber: log lines on stderr that `directives`
/// (an `EnvFilter` string such as `warn` or `info,understudy=debug`)
/// select, and, when `telemetry` names an OTLP endpoint, calls' spans sent
/// there until the returned guard drops. Call once, first thing.
///
/// The filter is global (what it disables costs nothing); the exporting
/// layer has its own filter on top, so that only calls' spans are ever
/// exported, whatever the log level.
pub fn init(directives: &str, telemetry: Option<&TelemetryConfig>) -> Result<Option<TraceExport>, TelemetryError> {
    let export = match telemetry.and_then(|telemetry| telemetry.otlp_endpoint.as_deref().map(|url| (telemetry, url))) {
        None => None,
        Some((telemetry, endpoint)) => Some(TraceExport::start(endpoint, &telemetry.service_name)?),
    };
    let filter = match &export {
        None => EnvFilter::new(directives),
        Some(_) => EnvFilter::new(format!("{directives},{CALL_TARGET}=info")),
    };
    let otel = export.as_ref().map(|export| {
        tracing_opentelemetry::layer()
            .with_tracer(export.provider.tracer("understudy"))
            .with_filter(Targets::new().with_target(CALL_TARGET, Level::INFO))
    });
    // A second call (tests that run commands in one process) keeps the first.
    let _ = Registry::default()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(otel)
        .try_init();
    Ok(export)
}

/// Spans are exported while this lives; dropping it sends what is buffered.
pub struct TraceExport {
    provider: SdkTracerProvider,
    endpoint: String,
}

impl TraceExport {
    fn start(endpoint: &str, service_name: &str) -> Result<TraceExport, TelemetryError> {
        let traces_url = format!("{endpoint}/v1/traces");
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(traces_url.clone())
            .build()
            .map_err(|error| TelemetryError::Exporter { endpoint: traces_url.clone(), message: error.to_string() })?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name(service_name.to_string()).build())
            .build();
        Ok(TraceExport { provider, endpoint: traces_url })
    }

    /// Where the spans go (`…/v1/traces`).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }
}

impl Drop for TraceExport {
    fn drop(&mut self) {
        // Sends what the batch still holds; a collector that is down only
        // costs the exporter's own timeout.
        if let Err(error) = self.provider.shutdown() {
            eprintln!("warning: traces could not be flushed to {}: {error}", self.endpoint);
        }
    }
}
