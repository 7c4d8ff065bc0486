//! Turns generated token pieces into released text: holds back bytes that
//! could still become a stop sequence (so no partial stop text leaks to a
//! stream), cuts the output at the first stop sequence, and releases only
//! complete UTF-8 characters. [`JsonObject`] finds where an answer that must
//! be a JSON object ends.

use serde_json::Value;

#[derive(Debug)]
struct PendingToken {
    start: usize,
    end: usize,
    /// Some of its bytes were already released.
    begun: bool,
    logprob: Option<Value>,
}

/// What one pushed token released.
#[derive(Debug, Default, PartialEq)]
pub struct Released {
    pub text: String,
    pub logprobs: Vec<Value>,
    /// A stop sequence was found: generation ends here.
    pub stopped: bool,
}

#[derive(Debug)]
pub struct StopBuffer {
    stops: Vec<String>,
    pending: Vec<u8>,
    tokens: Vec<PendingToken>,
}

impl StopBuffer {
    pub fn new(stops: Vec<String>) -> StopBuffer {
        StopBuffer {
            stops: stops.into_iter().filter(|stop| !stop.is_empty()).collect(),
            pending: Vec::new(),
            tokens: Vec::new(),
        }
    }

    pub fn push(&mut self, piece: &[u8], logprob: Option<Value>) -> Released {
        let start = self.pending.len();
        self.pending.extend_from_slice(piece);
        self.tokens.push(PendingToken { start, end: self.pending.len(), begun: false, logprob });
        if let Some(cut) = self.first_stop() {
            let mut released = self.release(cut, true);
            released.stopped = true;
            self.pending.clear();
            self.tokens.clear();
            return released;
        }
        let hold = self.held_back();
        let limit = self.pending.len() - hold;
        self.release(limit, false)
    }

    /// Releases everything still held (generation ended without a stop sequence).
    pub fn finish(&mut self) -> Released {
        let len = self.pending.len();
        self.release(len, true)
    }

    fn first_stop(&self) -> Option<usize> {
        self.stops.iter().filter_map(|stop| find(&self.pending, stop.as_bytes())).min()
    }

    /// The longest suffix of the pending bytes that is a proper prefix of a stop sequence.
    fn held_back(&self) -> usize {
        let mut hold = 0;
        for stop in &self.stops {
            let stop = stop.as_bytes();
            for len in (1..stop.len()).rev() {
                if len <= self.pending.len() && self.pending.ends_with(&stop[..len]) {
                    hold = hold.max(len);
                    break;
                }
            }
        }
        hold
    }

    /// Releases up to `limit` bytes (fewer to end on a character boundary,
    /// unless `all`), with the logprobs of the tokens it completes. At a stop
    /// (`all` with a cut inside the pending bytes), a token that began before
    /// the cut counts as emitted.
    fn release(&mut self, limit: usize, all: bool) -> Released {
        let mut cut = limit;
        if !all {
            match std::str::from_utf8(&self.pending[..cut]) {
                Ok(_) => {}
                Err(error) if error.error_len().is_none() => cut = error.valid_up_to(),
                Err(_) => {}
            }
        }
        let text = String::from_utf8_lossy(&self.pending[..cut]).into_owned();
        let mut logprobs = Vec::new();
        let mut n_done = 0;
        for token in &mut self.tokens {
            let done = if all { token.start < cut || token.begun || token.end <= cut } else { token.end <= cut };
            if !done {
                break;
            }
            if let Some(logprob) = token.logprob.take() {
                logprobs.push(logprob);
            }
            n_done += 1;
        }
        if all {
            n_done = self.tokens.len();
        }
        self.tokens.drain(..n_done);
        self.pending.drain(..cut);
        for token in &mut self.tokens {
            token.begun = token.begun || token.start < cut;
            token.start = token.start.saturating_sub(cut);
            token.end -= cut;
        }
        Released { text, logprobs, stopped: false }
    }
}

/// How far a [`JsonObject`] has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonProgress {
    /// The object has not ended yet (or not begun: only whitespace so far).
    Open,
    /// The object's closing brace is byte `used - 1` of the last piece: the
    /// rest of that piece is not part of the answer.
    Complete { used: usize },
    /// Something other than whitespace came before the opening brace.
    NotAnObject,
}

/// The answer of a request with `response_format` json_object: leading
/// whitespace, then one JSON object. Tracks nesting outside strings, so
/// decoding can stop at the object's closing brace instead of asking the
/// model for tokens after it (at least the end-of-turn token).
#[derive(Debug, Default)]
pub struct JsonObject {
    text: Vec<u8>,
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl JsonObject {
    pub fn feed(&mut self, piece: &[u8]) -> JsonProgress {
        for (idx, &byte) in piece.iter().enumerate() {
            if self.text.is_empty() {
                if byte.is_ascii_whitespace() {
                    continue;
                }
                if byte != b'{' {
                    return JsonProgress::NotAnObject;
                }
            }
            self.text.push(byte);
            if self.in_string {
                if self.escaped {
                    self.escaped = false;
                } else if byte == b'\\' {
                    self.escaped = true;
                } else if byte == b'"' {
                    self.in_string = false;
                }
                continue;
            }
            match byte {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        return JsonProgress::Complete { used: idx + 1 };
                    }
                }
                _ => {}
            }
        }
        JsonProgress::Open
    }

    /// Whether the complete object's text is JSON: the nesting count does
    /// not see a bare word or a mismatched bracket.
    pub fn check(&self) -> Result<(), serde_json::Error> {
        serde_json::from_slice::<serde_json::Map<String, Value>>(&self.text).map(|_| ())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || needle.len() > haystack.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let mut buffer = StopBuffer::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for piece in pieces {
            let released = buffer.push(piece.as_bytes(), None);
            out.push(released.text);
            if released.stopped {
                return (out, true);
            }
        }
        out.push(buffer.finish().text);
        (out, false)
    }

    #[test]
    fn partial_stop_text_is_held_back() {
        let (out, stopped) = run(&["END"], &["hel", "lo E", "N", "D more"]);
        assert!(stopped);
        assert_eq!(out, vec!["hel", "lo ", "", ""]);
        assert_eq!(out.concat(), "hello ");
    }

    #[test]
    fn a_false_alarm_is_released_later() {
        let (out, stopped) = run(&["END"], &["a E", "N", "x"]);
        assert!(!stopped);
        assert_eq!(out.concat(), "a ENx");
        assert_eq!(out[0], "a ");
    }

    #[test]
    fn split_characters_are_released_whole() {
        let bytes = "é".as_bytes();
        let mut buffer = StopBuffer::new(vec![]);
        assert_eq!(buffer.push(&bytes[..1], None).text, "");
        assert_eq!(buffer.push(&bytes[1..], None).text, "é");
    }

    #[test]
    fn a_json_object_ends_at_its_closing_brace() {
        let mut json = JsonObject::default();
        for piece in [" \n{", "\"a\": \"}", "{\\\"", "\", \"b\": [1, {\"c\"", ": 2}]"] {
            assert_eq!(json.feed(piece.as_bytes()), JsonProgress::Open, "{piece:?}");
        }
        assert_eq!(json.feed(b"}\n\nmore"), JsonProgress::Complete { used: 1 });
        json.check().unwrap();

        let mut prose = JsonObject::default();
        assert_eq!(prose.feed(b"  Here is"), JsonProgress::NotAnObject);
        let mut bare = JsonObject::default();
        assert_eq!(bare.feed(b"{name: Ann}"), JsonProgress::Complete { used: 11 });
        assert!(bare.check().is_err());
    }

    #[test]
    fn logprobs_follow_their_tokens() {
        let mut buffer = StopBuffer::new(vec!["\n\n".into()]);
        let first = buffer.push(b"a\n", Some(Value::from(1)));
        assert_eq!(first.text, "a");
        assert!(first.logprobs.is_empty());
        let second = buffer.push(b"\nb", Some(Value::from(2)));
        assert!(second.stopped);
        assert_eq!(second.text, "");
        assert_eq!(second.logprobs, vec![Value::from(1)]);
    }
}
