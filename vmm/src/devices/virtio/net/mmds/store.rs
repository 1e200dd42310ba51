//! The MMDS data store and its guest-facing HTTP semantics (Firecracker's): a JSON document the
//! operator sets with `PUT /mmds` and merges into with `PATCH /mmds` (RFC 7396), that a guest
//! reads by path over HTTP at the MMDS address. A GET answers JSON when the guest asks for
//! `Accept: application/json`, else the IMDS text form (an object lists its keys, one per line,
//! objects with a trailing `/`; a string is its value). Version 2 requires a session token:
//! `PUT /latest/api/token` with `X-metadata-token-ttl-seconds` (1-21600) gives one, and every
//! GET must carry it in `X-metadata-token`. Version 1 takes requests with or without one.

use std::collections::HashMap;
use std::time::{Duration, Instant};

pub use shoal_vmm_config::{MmdsConfig, MmdsVersion};

/// Firecracker's default data store limit (its API payload limit).
pub const DEFAULT_SIZE_LIMIT: usize = 51200;
/// Longest session a token may ask for.
const MAX_TOKEN_TTL_S: u64 = 21600;
/// Live tokens kept at most; the oldest goes when a new one would exceed it.
const MAX_TOKENS: usize = 1024;
/// Longest request a guest may send (request line and headers).
pub const MAX_REQUEST: usize = 8192;

/// The document and the sessions.
#[derive(Debug)]
pub struct MmdsStore {
    data: serde_json::Value,
    limit: usize,
    version: MmdsVersion,
    tokens: HashMap<String, Instant>,
}

/// A guest's HTTP request, parsed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct GuestRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// The client asked for the connection to close after the answer (or spoke HTTP/1.0).
    pub close: bool,
}

impl GuestRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Parses one request from the start of `bytes`: Ok(None) while the head is incomplete;
/// returns the request and the bytes it used (a body, if any, by Content-Length).
pub fn parse_request(bytes: &[u8]) -> Result<Option<(GuestRequest, usize)>, &'static str> {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if bytes.len() > MAX_REQUEST { Err("request too long") } else { Ok(None) };
    };
    let head = std::str::from_utf8(&bytes[..end]).map_err(|_| "request is not text")?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let (Some(method), Some(path), Some(proto), None) = (first.next(), first.next(), first.next(), first.next()) else {
        return Err("bad request line");
    };
    if !proto.starts_with("HTTP/1.") || method.is_empty() || !path.starts_with('/') {
        return Err("bad request line");
    }
    let mut req =
        GuestRequest { method: method.into(), path: path.into(), close: proto == "HTTP/1.0", ..Default::default() };
    for line in lines {
        let (name, value) = line.split_once(':').ok_or("bad header")?;
        req.headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    if req.header("Connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
        req.close = true;
    }
    let body = match req.header("Content-Length") {
        Some(v) => v.parse::<usize>().map_err(|_| "bad Content-Length")?,
        None => 0,
    };
    if body > MAX_REQUEST {
        return Err("request too long");
    }
    let used = end + 4 + body;
    Ok((bytes.len() >= used).then_some((req, used)))
}

/// An HTTP answer as bytes, with the status line and headers.
pub fn response(status: u16, content_type: &str, body: &str, close: bool) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        _ => "Error",
    };
    let connection = if close { "\r\nConnection: close" } else { "" };
    format!(
        "HTTP/1.1 {status} {reason}\r\nServer: shoal-mmds\r\nContent-Type: {content_type}\r\nContent-Length: {}{connection}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// RFC 7396 JSON merge patch.
fn merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
    let serde_json::Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = serde_json::Value::Object(serde_json::Map::new());
    }
    if let serde_json::Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
    }
}

impl MmdsStore {
    pub fn new(limit: usize) -> MmdsStore {
        MmdsStore {
            data: serde_json::Value::Object(serde_json::Map::new()),
            limit,
            version: MmdsVersion::V1,
            tokens: HashMap::new(),
        }
    }

    pub fn set_version(&mut self, version: MmdsVersion) {
        self.version = version;
    }

    pub fn data(&self) -> &serde_json::Value {
        &self.data
    }

    fn check_size(&self, v: &serde_json::Value) -> Result<(), String> {
        let size = serde_json::to_vec(v).map_or(usize::MAX, |b| b.len());
        if size > self.limit {
            return Err(format!("The MMDS data store limit ({} bytes) would be exceeded ({size} bytes).", self.limit));
        }
        Ok(())
    }

    /// `PUT /mmds`: replaces the document (an object).
    pub fn put(&mut self, v: serde_json::Value) -> Result<(), String> {
        if !v.is_object() {
            return Err("The MMDS data store must be a JSON object.".into());
        }
        self.check_size(&v)?;
        self.data = v;
        Ok(())
    }

    /// `PATCH /mmds`: merges `patch` in (nothing changes if the result would be too large).
    pub fn patch(&mut self, patch: &serde_json::Value) -> Result<(), String> {
        let mut next = self.data.clone();
        merge(&mut next, patch);
        if !next.is_object() {
            return Err("The MMDS data store must stay a JSON object.".into());
        }
        self.check_size(&next)?;
        self.data = next;
        Ok(())
    }

    fn new_token(&mut self, ttl: Duration, now: Instant) -> String {
        self.tokens.retain(|_, expiry| *expiry > now);
        if self.tokens.len() >= MAX_TOKENS {
            if let Some(oldest) = self.tokens.iter().min_by_key(|(_, e)| **e).map(|(t, _)| t.clone()) {
                self.tokens.remove(&oldest);
            }
        }
        use crate::devices::virtio::rng::{Entropy, HostEntropy};
        let mut raw = [0u8; 24];
        if HostEntropy.fill(&mut raw).is_err() {
            // No entropy source: a token that can never match is refused below.
            return String::new();
        }
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        self.tokens.insert(token.clone(), now + ttl);
        token
    }

    fn token_valid(&self, token: &str, now: Instant) -> bool {
        !token.is_empty() && self.tokens.get(token).is_some_and(|e| *e > now)
    }

    /// Answers one guest request (the whole HTTP response).
    pub fn answer(&mut self, req: &GuestRequest, now: Instant) -> Vec<u8> {
        let close = req.close;
        let text = "text/plain";
        let path = req.path.split('?').next().unwrap_or("");
        if path == "/latest/api/token" {
            if req.method != "PUT" {
                return response(405, text, "Not allowed HTTP method.", close);
            }
            if req.header("X-Forwarded-For").is_some() {
                return response(400, text, "Invalid header. Reason: X-Forwarded-For header is not allowed.", close);
            }
            let ttl = req.header("X-metadata-token-ttl-seconds").and_then(|v| v.parse::<u64>().ok());
            return match ttl {
                Some(s) if (1..=MAX_TOKEN_TTL_S).contains(&s) => {
                    let token = self.new_token(Duration::from_secs(s), now);
                    if token.is_empty() {
                        response(400, text, "Cannot generate a session token.", close)
                    } else {
                        response(200, text, &token, close)
                    }
                }
                _ => response(
                    400,
                    text,
                    "Token time to live value not found. Use `X-metadata-token-ttl-seconds` header to specify the token's lifetime (1 to 21600 seconds).",
                    close,
                ),
            };
        }
        if req.method != "GET" {
            return response(405, text, "Not allowed HTTP method.", close);
        }
        let token = req.header("X-metadata-token");
        match (self.version, token) {
            (MmdsVersion::V2, None) => {
                return response(
                    401,
                    text,
                    "No MMDS token provided. Use `X-metadata-token` header to specify the session token.",
                    close,
                )
            }
            (_, Some(t)) if !self.token_valid(t, now) => return response(401, text, "MMDS token not valid.", close),
            _ => {}
        }
        let mut node = &self.data;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            let next = match node {
                serde_json::Value::Object(m) => m.get(part),
                serde_json::Value::Array(a) => part.parse::<usize>().ok().and_then(|i| a.get(i)),
                _ => None,
            };
            match next {
                Some(n) => node = n,
                None => return response(404, text, &format!("Resource not found: {path}."), close),
            }
        }
        let json = req.header("Accept").is_some_and(|a| a.contains("application/json"));
        if json {
            return response(200, "application/json", &node.to_string(), close);
        }
        match node {
            serde_json::Value::String(s) => response(200, text, s, close),
            serde_json::Value::Object(m) => {
                let keys: Vec<String> =
                    m.iter().map(|(k, v)| if v.is_object() { format!("{k}/") } else { k.clone() }).collect();
                response(200, text, &keys.join("\n"), close)
            }
            other => response(200, text, &other.to_string(), close),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(store: &mut MmdsStore, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
        let mut text = format!("GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n");
        for (k, v) in headers {
            text.push_str(&format!("{k}: {v}\r\n"));
        }
        text.push_str("\r\n");
        let (req, used) = parse_request(text.as_bytes()).unwrap().unwrap();
        assert_eq!(used, text.len());
        split(&store.answer(&req, Instant::now()))
    }

    fn split(resp: &[u8]) -> (u16, String) {
        let text = String::from_utf8(resp.to_vec()).unwrap();
        let status = text[9..12].parse().unwrap();
        (status, text[text.find("\r\n\r\n").unwrap() + 4..].to_string())
    }

    #[test]
    fn paths_answer_imds_text_or_json_and_patches_merge() {
        let mut s = MmdsStore::new(DEFAULT_SIZE_LIMIT);
        s.put(serde_json::json!({"latest": {"meta-data": {"ami-id": "ami-12345678", "reservation-id": "r-1", "net": {"ip": "10.0.0.2"}}}}))
            .unwrap();
        assert_eq!(get(&mut s, "/latest/meta-data/ami-id", &[]), (200, "ami-12345678".into()));
        assert_eq!(get(&mut s, "/latest/meta-data/", &[]), (200, "ami-id\nnet/\nreservation-id".into()));
        let (st, body) = get(&mut s, "/latest/meta-data", &[("Accept", "application/json")]);
        assert_eq!(st, 200);
        assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["net"]["ip"], "10.0.0.2");
        assert_eq!(get(&mut s, "/latest/nope", &[]).0, 404);
        s.patch(&serde_json::json!({"latest": {"meta-data": {"reservation-id": null, "new": "x"}}})).unwrap();
        assert_eq!(get(&mut s, "/latest/meta-data/", &[]), (200, "ami-id\nnet/\nnew".into()));
        // Limits: not an object, too large; nothing changes.
        assert!(s.put(serde_json::json!([1, 2])).is_err());
        assert!(s.patch(&serde_json::json!({"big": "x".repeat(DEFAULT_SIZE_LIMIT)})).is_err());
        assert_eq!(get(&mut s, "/latest/meta-data/new", &[]), (200, "x".into()));
    }

    #[test]
    fn version_2_wants_a_session_token() {
        let mut s = MmdsStore::new(DEFAULT_SIZE_LIMIT);
        s.put(serde_json::json!({"k": "v"})).unwrap();
        s.set_version(MmdsVersion::V2);
        assert_eq!(get(&mut s, "/k", &[]).0, 401);
        assert_eq!(get(&mut s, "/k", &[("X-metadata-token", "forged")]).0, 401);
        let put = |s: &mut MmdsStore, headers: &str| {
            let text = format!("PUT /latest/api/token HTTP/1.1\r\n{headers}\r\n");
            let (req, _) = parse_request(text.as_bytes()).unwrap().unwrap();
            split(&s.answer(&req, Instant::now()))
        };
        assert_eq!(put(&mut s, "").0, 400);
        assert_eq!(put(&mut s, "X-metadata-token-ttl-seconds: 0\r\n").0, 400);
        assert_eq!(put(&mut s, "X-metadata-token-ttl-seconds: 60\r\nX-Forwarded-For: 1.2.3.4\r\n").0, 400);
        let (st, token) = put(&mut s, "X-metadata-token-ttl-seconds: 60\r\n");
        assert_eq!((st, token.len()), (200, 48));
        assert_eq!(get(&mut s, "/k", &[("X-metadata-token", &token)]), (200, "v".into()));
        // An expired token is refused.
        let (req, _) =
            parse_request(format!("GET /k HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n").as_bytes()).unwrap().unwrap();
        assert_eq!(split(&s.answer(&req, Instant::now() + Duration::from_secs(61))).0, 401);
    }

    #[test]
    fn malformed_requests_are_errors_not_panics() {
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\n"), Ok(None));
        for bad in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET nopath HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
            b"GET / SPDY\r\n\r\n",
        ] {
            assert!(parse_request(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(parse_request(&vec![b'a'; MAX_REQUEST + 1]).is_err());
        let (req, used) = parse_request(b"GET / HTTP/1.0\r\n\r\nGET /x").unwrap().unwrap();
        assert!(req.close && used == 18);
    }
}
