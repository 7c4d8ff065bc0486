//! Any OpenAI-compatible upstream: OpenAI itself, vLLM, llama.cpp's server,
//! or a stub on loopback; and `Upstream`, the HTTP client, retry and
//! timeout policy it shares with the Anthropic provider.
//!
//! Requests go out as JSON with the caller's fields intact. Only failures
//! before any answer arrives (a refused or reset connection, no headers
//! within the timeout) are retried, with exponential backoff. An answer with
//! an error status, 4xx or 5xx, is passed back with its status, body and the
//! headers clients act on ([`passed_headers`]): the client's SDK decides
//! whether to retry it (OpenAI's do, on 408, 409, 429 and 5xx, honouring
//! `retry-after`), so retrying here as well would multiply the attempts.

use std::time::Duration;

use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use serde_json::{json, Value};
use understudy_config::OpenAiProviderConfig;

use crate::{ChatRequest, EmbeddingRequest, HeaderMap, Provider, ProviderError, ProviderResponse, StreamResponse};

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
    completions_url: reqwest::Url,
    responses_url: reqwest::Url,
}

impl OpenAiProvider {
    pub fn new(name: &str, config: &OpenAiProviderConfig) -> Result<OpenAiProvider, ProviderError> {
        let mut headers = HeaderMap::new();
        if let Some(key) = config.api_key_env.as_deref().and_then(|variable| api_key_from_env(name, variable)) {
            headers.insert(reqwest::header::AUTHORIZATION, secret_header(name, &format!("Bearer {key}"))?);
        }
        let upstream =
            Upstream::new(name, headers, passed_headers, config.timeout, config.max_retries, config.retry_backoff)?;
        Ok(OpenAiProvider {
            upstream,
            chat_url: parse_url(name, &format!("{}/chat/completions", config.base_url))?,
            embeddings_url: parse_url(name, &format!("{}/embeddings", config.base_url))?,
            completions_url: parse_url(name, &format!("{}/completions", config.base_url))?,
            responses_url: parse_url(name, &format!("{}/responses", config.base_url))?,
        })
    }

    /// A complete JSON answer, with the upstream's `usage` and passed headers.
    async fn complete(&self, url: &reqwest::Url, body: Bytes) -> Result<ProviderResponse, ProviderError> {
        let (body, headers) = self.upstream.complete(url, body).await?;
        let usage = crate::usage_of_body(&body).map_err(|error| ProviderError::BadResponse {
            provider: self.upstream.name.clone(),
            message: format!("the answer is not JSON: {error}"),
        })?;
        Ok(ProviderResponse { usage, body, headers, compute: None })
    }

    /// A streamed answer from `url`: its chunks' `data:` payloads, after the
    /// same retries and checks for chat, legacy completions and responses.
    async fn stream(
        &self,
        url: &reqwest::Url,
        body: serde_json::Map<String, Value>,
        ask_usage: bool,
    ) -> Result<StreamResponse, ProviderError> {
        let mut body = body;
        // Ask for usage even when the client did not, so that the record has
        // the upstream's own counts; the gateway hides that chunk if unasked.
        if ask_usage {
            let stream_options = body.entry("stream_options").or_insert_with(|| json!({}));
            if let Value::Object(options) = stream_options {
                options.insert("include_usage".into(), Value::Bool(true));
            }
        }
        let (events, headers) = self.upstream.open_stream(url, encode(&Value::Object(body))?).await?;
        let chunks = events
            .take_while(|item| futures::future::ready(!matches!(item, Ok(event) if event.data.trim() == "[DONE]")))
            .map(|item| item.map(|event| event.data))
            // Keep-alive comments and empty events carry no chunk.
            .filter(|item| futures::future::ready(!matches!(item, Ok(data) if data.trim().is_empty())));
        Ok(StreamResponse { chunks: Box::pin(chunks), headers })
    }

    /// `POST /completions` (OpenAI's legacy text completions), not streamed.
    pub async fn text_completion(&self, request: ChatRequest) -> Result<ProviderResponse, ProviderError> {
        let body = encode(&Value::Object(request.body))?;
        self.complete(&self.completions_url, body).await
    }

    /// `POST /completions`, streamed (the body asks for it); usage is asked for as in chat.
    pub async fn text_completion_stream(&self, request: ChatRequest) -> Result<StreamResponse, ProviderError> {
        self.stream(&self.completions_url, request.body, true).await
    }

    /// `POST /responses` (OpenAI's Responses API), not streamed. The body is
    /// a Responses request in a [`ChatRequest`]'s shape (a JSON object).
    pub async fn responses(&self, request: ChatRequest) -> Result<ProviderResponse, ProviderError> {
        let body = encode(&Value::Object(request.body))?;
        self.complete(&self.responses_url, body).await
    }

    /// `POST /responses`, streamed. A Responses stream always ends with the
    /// whole response and its usage (`response.completed`), so no
    /// `stream_options` is added (the API refuses `include_usage`).
    pub async fn responses_stream(&self, request: ChatRequest) -> Result<StreamResponse, ProviderError> {
        self.stream(&self.responses_url, request.body, false).await
    }
}

/// The headers of an upstream's answer that reach the client, because
/// clients act on them: when to retry (`retry-after`, `retry-after-ms`),
/// how much of their rate limits is left (`x-ratelimit-*`), and what they
/// log to trace a call with the upstream (`x-request-id`,
/// `openai-processing-ms`). Others (cookies, the upstream's organization,
/// its framing) stay here.
pub fn passed_headers(headers: &HeaderMap) -> HeaderMap {
    let mut passed = HeaderMap::new();
    for (name, value) in headers {
        let name_text = name.as_str();
        let passes = matches!(name_text, "retry-after" | "retry-after-ms" | "x-request-id" | "openai-processing-ms")
            || name_text.starts_with("x-ratelimit-");
        if passes {
            passed.append(name.clone(), value.clone());
        }
    }
    passed
}

/// An HTTP upstream: a client, the headers every request carries (the key),
/// which of an answer's headers reach the client, and the timeout and retry
/// policy (the module's: only failures before an answer are retried).
#[derive(Debug)]
pub(crate) struct Upstream {
    pub(crate) name: String,
    client: reqwest::Client,
    headers: HeaderMap,
    /// The headers of an answer (or error answer) that reach the client, in
    /// the names OpenAI's clients read.
    passed: fn(&HeaderMap) -> HeaderMap,
    timeout: Duration,
    max_retries: u32,
    retry_backoff: Duration,
}

impl Upstream {
    pub(crate) fn new(
        name: &str,
        headers: HeaderMap,
        passed: fn(&HeaderMap) -> HeaderMap,
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
        Ok(Upstream { name: name.to_string(), client, headers, passed, timeout, max_retries, retry_backoff })
    }

    fn timeout_error(&self) -> ProviderError {
        ProviderError::Timeout { provider: self.name.clone(), timeout: self.timeout }
    }

    /// Sends `body` until an answer arrives, whatever its status, or retries
    /// run out. Returns the response with its headers read and its body not
    /// yet read, and the deadline for reading that body (the attempt's
    /// start plus the timeout).
    async fn send_with_retries(
        &self,
        url: &reqwest::Url,
        body: Bytes,
    ) -> Result<(reqwest::Response, tokio::time::Instant), ProviderError> {
        let mut last_error = String::new();
        let mut timed_out = false;
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
            let deadline = tokio::time::Instant::now() + self.timeout;
            let send = tokio::time::timeout_at(deadline, request.send());
            // A disabled span is not entered on every poll.
            let sent =
                if span.is_disabled() { send.await } else { tracing::Instrument::instrument(send, span.clone()).await };
            if !span.is_disabled() {
                match &sent {
                    Ok(Ok(response)) => span.record("http.status_code", response.status().as_u16()),
                    Ok(Err(error)) => span.record("error", describe_request_error(error).as_str()),
                    Err(_elapsed) => span.record("error", "timed out"),
                };
            }
            match sent {
                // An answer, whatever its status: the client's to act on.
                Ok(Ok(response)) => return Ok((response, deadline)),
                Err(_elapsed) => {
                    timed_out = true;
                    last_error = format!("no answer within {:?}", self.timeout);
                }
                Ok(Err(error)) => {
                    timed_out = error.is_timeout();
                    // Without the URL: it may carry credentials in some setups.
                    last_error = describe_request_error(&error);
                }
            }
            tracing::warn!(provider = %self.name, attempt = attempt_idx + 1, error = %last_error, "upstream attempt failed");
        }
        if timed_out {
            return Err(self.timeout_error());
        }
        Err(ProviderError::Unavailable { provider: self.name.clone(), attempts: n_attempts, last_error })
    }

    /// The body of an answer whose headers are in, read by `deadline`.
    async fn read_body(
        &self,
        response: reqwest::Response,
        deadline: tokio::time::Instant,
    ) -> Result<Bytes, ProviderError> {
        tokio::time::timeout_at(deadline, response.bytes()).await.map_err(|_| self.timeout_error())?.map_err(|error| {
            ProviderError::Unavailable {
                provider: self.name.clone(),
                attempts: 1,
                last_error: format!("reading the answer failed: {}", describe_request_error(&error)),
            }
        })
    }

    /// An answer with an error status, passed on as it came.
    async fn rejection(
        &self,
        response: reqwest::Response,
        deadline: tokio::time::Instant,
        headers: HeaderMap,
    ) -> ProviderError {
        let status = response.status().as_u16();
        // A body that cannot be read still leaves the status to pass on.
        let body = self.read_body(response, deadline).await.unwrap_or_default();
        ProviderError::Rejected { provider: self.name.clone(), status, body, headers: Box::new(headers) }
    }

    /// A complete answer's body and passed headers: retries, then reads the
    /// body within the timeout. Any status other than 2xx is `Rejected` with
    /// the body as sent.
    pub(crate) async fn complete(&self, url: &reqwest::Url, body: Bytes) -> Result<(Bytes, HeaderMap), ProviderError> {
        let (response, deadline) = self.send_with_retries(url, body).await?;
        let headers = (self.passed)(response.headers());
        if !response.status().is_success() {
            return Err(self.rejection(response, deadline, headers).await);
        }
        let body = self.read_body(response, deadline).await?;
        Ok((body, headers))
    }

    /// Sends a stream request; returns its events, and the passed headers,
    /// once the answer is known to be a 2xx event stream. Each event waits
    /// at most the timeout.
    pub(crate) async fn open_stream(
        &self,
        url: &reqwest::Url,
        body: Bytes,
    ) -> Result<
        (impl futures::Stream<Item = Result<eventsource_stream::Event, ProviderError>> + Send + 'static, HeaderMap),
        ProviderError,
    > {
        let (response, deadline) = self.send_with_retries(url, body).await?;
        let headers = (self.passed)(response.headers());
        if !response.status().is_success() {
            return Err(self.rejection(response, deadline, headers).await);
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
        let events = futures::stream::unfold(Some(Box::pin(events)), move |events| {
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
        });
        Ok((events, headers))
    }
}

impl Provider for OpenAiProvider {
    const PROVIDER_TYPE: &'static str = "openai";

    async fn infer(&self, request: ChatRequest) -> Result<ProviderResponse, ProviderError> {
        let body = encode(&Value::Object(request.body))?;
        self.complete(&self.chat_url, body).await
    }

    async fn infer_stream(&self, request: ChatRequest) -> Result<StreamResponse, ProviderError> {
        self.stream(&self.chat_url, request.body, true).await
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
