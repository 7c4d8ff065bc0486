//! Any OpenAI-compatible upstream: OpenAI itself, vLLM, llama.cpp's server,
//! or a stub on loopback.
//!
//! Requests go out as JSON with the caller's fields intact. A 5xx answer or a
//! refused connection is retried with exponential backoff; a 4xx answer is the
//! upstream's verdict on the request and is passed back unchanged.

use std::time::Duration;

use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{json, Value};
use understudy_config::OpenAiProviderConfig;

use crate::{ChatRequest, ChunkStream, EmbeddingRequest, Provider, ProviderError, ProviderResponse};

/// An API key as a header value that never prints (`Debug` shows `Sensitive`).
pub(crate) fn secret_header(provider: &str, value: &str) -> Result<reqwest::header::HeaderValue, ProviderError> {
    let mut header = reqwest::header::HeaderValue::from_str(value).map_err(|_| ProviderError::Setup {
        provider: provider.to_string(),
        message: "the API key holds characters a header cannot carry".to_string(),
    })?;
    header.set_sensitive(true);
    Ok(header)
}

/// The key in `variable`, if it is set and not empty (a warning otherwise).
pub(crate) fn api_key_from_env(provider: &str, variable: &str) -> Option<String> {
    match std::env::var(variable) {
        Ok(key) if !key.is_empty() => Some(key),
        _ => {
            tracing::warn!(provider, variable, "API key variable is not set; sending no key");
            None
        }
    }
}

#[derive(Debug)]
pub struct OpenAiProvider {
    upstream: Upstream,
    chat_url: reqwest::Url,
    embeddings_url: reqwest::Url,
}

impl OpenAiProvider {
    pub fn new(name: &str, config: &OpenAiProviderConfig) -> Result<OpenAiProvider, ProviderError> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(key) = config.api_key_env.as_deref().and_then(|variable| api_key_from_env(name, variable)) {
            headers.insert(reqwest::header::AUTHORIZATION, secret_header(name, &format!("Bearer {key}"))?);
        }
        let upstream = Upstream::new(name, headers, config.timeout, config.max_retries, config.retry_backoff)?;
        Ok(OpenAiProvider {
            upstream,
            chat_url: parse_url(name, &format!("{}/chat/completions", config.base_url))?,
            embeddings_url: parse_url(name, &format!("{}/embeddings", config.base_url))?,
        })
    }

    /// A complete JSON answer, with the upstream's `usage`.
    async fn complete(&self, url: &reqwest::Url, body: Bytes) -> Result<ProviderResponse, ProviderError> {
        let body = self.upstream.complete(url, body).await?;
        let usage = crate::usage_of_body(&body).map_err(|error| ProviderError::BadResponse {
            provider: self.upstream.name.clone(),
            message: format!("the answer is not JSON: {error}"),
        })?;
        Ok(ProviderResponse { usage, body })
    }
}

/// An HTTP upstream: a client, the headers every request carries (the key),
/// and the timeout and retry policy.
#[derive(Debug)]
pub(crate) struct Upstream {
    pub(crate) name: String,
    client: reqwest::Client,
    headers: reqwest::header::HeaderMap,
    pub(crate) timeout: Duration,
    max_retries: u32,
    retry_backoff: Duration,
}

impl Upstream {
    pub(crate) fn new(
        name: &str,
        headers: reqwest::header::HeaderMap,
        timeout: Duration,
        max_retries: u32,
        retry_backoff: Duration,
    ) -> Result<Upstream, ProviderError> {
        let client = reqwest::Client::builder()
            .tcp_nodelay(true)
            .pool_max_idle_per_host(1024)
            .pool_idle_timeout(Duration::from_secs(90))
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|error| ProviderError::Setup { provider: name.to_string(), message: error.to_string() })?;
        Ok(Upstream { name: name.to_string(), client, headers, timeout, max_retries, retry_backoff })
    }

    pub(crate) fn timeout_error(&self) -> ProviderError {
        ProviderError::Timeout { provider: self.name.clone(), timeout: self.timeout }
    }

    /// Sends `body` until an answer other than 5xx arrives, or retries run out.
    /// Returns the response with its headers read and its body not yet read.
    pub(crate) async fn send_with_retries(
        &self,
        url: &reqwest::Url,
        body: Bytes,
    ) -> Result<reqwest::Response, ProviderError> {
        let mut last_error = String::new();
        let n_attempts = self.max_retries + 1;
        for attempt_idx in 0..n_attempts {
            if attempt_idx > 0 {
                let backoff = self.retry_backoff * 2u32.saturating_pow(attempt_idx - 1);
                tokio::time::sleep(backoff).await;
            }
            let request = self
                .client
                .post(url.clone())
                .headers(self.headers.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone());
            // One span per attempt, a child of the call's (off unless traces are exported).
            let span = tracing::info_span!(
                target: understudy_types::CALL_SPAN_TARGET,
                "upstream",
                otel.kind = "client",
                provider = %self.name,
                attempt = attempt_idx + 1,
                http.status_code = tracing::field::Empty,
                error = tracing::field::Empty,
            );
            let sent =
                tracing::Instrument::instrument(tokio::time::timeout(self.timeout, request.send()), span.clone()).await;
            if !span.is_disabled() {
                match &sent {
                    Ok(Ok(response)) => span.record("http.status_code", response.status().as_u16()),
                    Ok(Err(error)) => span.record("error", describe_request_error(error).as_str()),
                    Err(_elapsed) => span.record("error", "timed out"),
                };
            }
            match sent {
                Err(_elapsed) => return Err(self.timeout_error()),
                Ok(Ok(response)) if response.status().is_server_error() => {
                    let status = response.status();
                    let text = response.text().await.unwrap_or_default();
                    last_error = format!("HTTP {status}: {}", truncate(&text, 300));
                }
                Ok(Ok(response)) => return Ok(response),
                Ok(Err(error)) if error.is_timeout() => return Err(self.timeout_error()),
                // Without the URL: it may carry credentials in some setups.
                Ok(Err(error)) => last_error = describe_request_error(&error),
            }
            tracing::warn!(provider = %self.name, attempt = attempt_idx + 1, error = %last_error, "upstream attempt failed");
        }
        Err(ProviderError::Unavailable { provider: self.name.clone(), attempts: n_attempts, last_error })
    }

    /// A complete answer's body: retries, then reads the body within the
    /// timeout. Any status other than 2xx is `Rejected` with the body as sent.
    pub(crate) async fn complete(&self, url: &reqwest::Url, body: Bytes) -> Result<Bytes, ProviderError> {
        let read = async {
            let response = self.send_with_retries(url, body).await?;
            let status = response.status();
            let body = response.bytes().await.map_err(|error| ProviderError::Unavailable {
                provider: self.name.clone(),
                attempts: 1,
                last_error: format!("reading the answer failed: {}", describe_request_error(&error)),
            })?;
            Ok::<_, ProviderError>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, read).await.map_err(|_| self.timeout_error())??;
        if !status.is_success() {
            return Err(ProviderError::Rejected { provider: self.name.clone(), status: status.as_u16(), body });
        }
        Ok(body)
    }

    /// Sends a stream request; returns its events once the answer is known
    /// to be a 2xx event stream. Each event waits at most the timeout.
    pub(crate) async fn open_stream(
        &self,
        url: &reqwest::Url,
        body: Bytes,
    ) -> Result<
        impl futures::Stream<Item = Result<eventsource_stream::Event, ProviderError>> + Send + 'static,
        ProviderError,
    > {
        let response = self.send_with_retries(url, body).await?;
        let status = response.status();
        if !status.is_success() {
            let body = response.bytes().await.unwrap_or_default();
            return Err(ProviderError::Rejected { provider: self.name.clone(), status: status.as_u16(), body });
        }
        // An upstream that ignores `stream` answers with one JSON body; read
        // as events it would look like an empty stream, so it is refused here,
        // before the client has been sent anything.
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(str::to_ascii_lowercase);
        if let Some(content_type) = content_type.filter(|value| !value.starts_with("text/event-stream")) {
            return Err(ProviderError::BadResponse {
                provider: self.name.clone(),
                message: format!("a stream was asked for, and the answer is `{content_type}`, not an event stream"),
            });
        }
        let provider = self.name.clone();
        let idle_timeout = self.timeout;
        let events = response.bytes_stream().eventsource();
        Ok(futures::stream::unfold(Some(Box::pin(events)), move |events| {
            let provider = provider.clone();
            async move {
                let mut events = events?;
                match tokio::time::timeout(idle_timeout, events.next()).await {
                    Err(_elapsed) => Some((Err(ProviderError::Timeout { provider, timeout: idle_timeout }), None)),
                    Ok(None) => None,
                    Ok(Some(Ok(event))) => Some((Ok(event), Some(events))),
                    Ok(Some(Err(error))) => Some((
                        Err(ProviderError::BadResponse { provider, message: format!("stream broke: {error}") }),
                        None,
                    )),
                }
            }
        }))
    }
}

impl Provider for OpenAiProvider {
    const PROVIDER_TYPE: &'static str = "openai";

    async fn infer(&self, request: ChatRequest) -> Result<ProviderResponse, ProviderError> {
        let body = encode(&Value::Object(request.body))?;
        self.complete(&self.chat_url, body).await
    }

    async fn infer_stream(&self, request: ChatRequest) -> Result<ChunkStream, ProviderError> {
        let mut body = request.body;
        // Ask for usage even when the client did not, so that the record has
        // the upstream's own counts; the gateway hides that chunk if unasked.
        let stream_options = body.entry("stream_options").or_insert_with(|| json!({}));
        if let Value::Object(options) = stream_options {
            options.insert("include_usage".into(), Value::Bool(true));
        }
        let events = self.upstream.open_stream(&self.chat_url, encode(&Value::Object(body))?).await?;
        let chunks = events
            .take_while(|item| futures::future::ready(!matches!(item, Ok(event) if event.data.trim() == "[DONE]")))
            .map(|item| item.map(|event| event.data))
            // Keep-alive comments and empty events carry no chunk.
            .filter(|item| futures::future::ready(!matches!(item, Ok(data) if data.trim().is_empty())));
        Ok(Box::pin(chunks))
    }

    async fn embed(&self, request: EmbeddingRequest) -> Result<ProviderResponse, ProviderError> {
        let body = encode(&Value::Object(request.body))?;
        self.complete(&self.embeddings_url, body).await
    }
}

pub(crate) fn parse_url(provider: &str, url: &str) -> Result<reqwest::Url, ProviderError> {
    reqwest::Url::parse(url).map_err(|error| ProviderError::Setup {
        provider: provider.to_string(),
        message: format!("`{url}` is not a valid URL: {error}"),
    })
}

pub(crate) fn encode(body: &Value) -> Result<Bytes, ProviderError> {
    serde_json::to_vec(body)
        .map(Bytes::from)
        .map_err(|error| ProviderError::Setup { provider: String::new(), message: error.to_string() })
}

fn describe_request_error(error: &reqwest::Error) -> String {
    let kind = if error.is_connect() {
        "connection failed"
    } else if error.is_body() || error.is_decode() {
        "body failed"
    } else {
        "request failed"
    };
    let mut message = kind.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

pub(crate) fn truncate(text: &str, max_chars: usize) -> String {
    match text.char_indices().nth(max_chars) {
        Some((byte_idx, _)) => format!("{}…", &text[..byte_idx]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Cloud upstreams are `https://`: the client opens a TLS session on the
    /// socket (its first bytes are a TLS handshake record), rather than
    /// refusing the scheme.
    #[tokio::test]
    async fn an_https_upstream_gets_a_tls_handshake() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|error| panic!("{error}"));
        let port = listener.local_addr().unwrap_or_else(|error| panic!("{error}")).port();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.ok()?;
            let mut first = [0u8; 3];
            socket.read_exact(&mut first).await.ok()?;
            Some(first)
        });
        let config = OpenAiProviderConfig {
            base_url: format!("https://127.0.0.1:{port}/v1"),
            api_key_env: None,
            timeout: Duration::from_secs(5),
            max_retries: 0,
            retry_backoff: Duration::from_millis(10),
        };
        let provider = OpenAiProvider::new("cloud", &config).unwrap_or_else(|error| panic!("{error}"));
        let request = ChatRequest { body: serde_json::Map::new() };
        let answer = tokio::spawn(async move { provider.infer(request).await });
        // A client without TLS never connects: the guard ends the wait.
        let first = match tokio::time::timeout(Duration::from_secs(60), server).await {
            Ok(joined) => joined.unwrap_or_else(|error| panic!("{error}")),
            Err(_) => None,
        };
        // 0x16: a handshake record; 0x03 0x01..0x03: a TLS record version.
        assert!(matches!(first, Some([0x16, 0x03, 0x01..=0x03])), "{first:?}");
        // The server hung up mid-handshake: an error, not an answer.
        let answer = answer.await.unwrap_or_else(|error| panic!("{error}"));
        assert!(answer.is_err());
    }
}
