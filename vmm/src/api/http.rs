//! A minimal HTTP/1.1 request parser and response writer for the control API: one request
//! (request line, headers, a Content-Length body) from a byte buffer, with hard limits on every
//! size. No I/O here; `server` feeds it bytes. Chunked bodies and HTTP/2 are refused.

/// Longest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// Largest body accepted (Firecracker's limit is 51200 bytes).
pub const MAX_BODY: usize = 51_200;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
    /// The client asked to close the connection after this request.
    pub close: bool,
}

/// Why a request could not be parsed, with the status to answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("request head is over {max} bytes", max = MAX_HEAD)]
    HeadTooLarge,
    #[error("request body of {0} bytes is over {max} bytes", max = MAX_BODY)]
    BodyTooLarge(usize),
    #[error("malformed request line")]
    BadRequestLine,
    #[error("unsupported HTTP version {0}")]
    Version(String),
    #[error("malformed header line")]
    BadHeader,
    #[error("invalid Content-Length")]
    BadContentLength,
    #[error("chunked transfer encoding is not supported")]
    Chunked,
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            HttpError::HeadTooLarge => 431,
            HttpError::BodyTooLarge(_) => 413,
            HttpError::Version(_) => 505,
            HttpError::Chunked => 501,
            _ => 400,
        }
    }
}

/// Tries to parse one request from the start of `buf`. `Ok(None)`: more bytes are needed.
/// `Ok(Some((request, used)))`: a request and how many bytes of `buf` it took.
pub fn parse(buf: &[u8]) -> Result<Option<(Request, usize)>, HttpError> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err(HttpError::HeadTooLarge);
        }
        return Ok(None);
    };
    if head_end > MAX_HEAD {
        return Err(HttpError::HeadTooLarge);
    }
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| HttpError::BadRequestLine)?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().ok_or(HttpError::BadRequestLine)?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(path), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::BadRequestLine);
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) || !path.starts_with('/') {
        return Err(HttpError::BadRequestLine);
    }
    let mut close = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        other => return Err(HttpError::Version(other.chars().take(16).collect())),
    };
    let mut content_length = 0usize;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or(HttpError::BadHeader)?;
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => content_length = value.parse().map_err(|_| HttpError::BadContentLength)?,
            "transfer-encoding" if !value.eq_ignore_ascii_case("identity") => return Err(HttpError::Chunked),
            "connection" if value.eq_ignore_ascii_case("close") => close = true,
            "connection" if value.eq_ignore_ascii_case("keep-alive") => close = false,
            _ => {}
        }
    }
    if content_length > MAX_BODY {
        return Err(HttpError::BodyTooLarge(content_length));
    }
    let body_start = head_end + 4;
    let Some(end) = body_start.checked_add(content_length) else { return Err(HttpError::BadContentLength) };
    if buf.len() < end {
        return Ok(None);
    }
    Ok(Some((
        Request { method: method.to_string(), path: path.to_string(), body: buf[body_start..end].to_vec(), close },
        end,
    )))
}

const JSON: &str = "application/json";

/// A response: status and an optional body (JSON unless said otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Option<String>,
    pub content_type: &'static str,
}

impl Response {
    pub fn no_content() -> Response {
        Response { status: 204, body: None, content_type: JSON }
    }

    pub fn json(status: u16, body: String) -> Response {
        Response { status, body: Some(body), content_type: JSON }
    }

    /// A plain-text body (Prometheus exposition format).
    pub fn prometheus(body: String) -> Response {
        Response { status: 200, body: Some(body), content_type: "text/plain; version=0.0.4" }
    }

    /// Firecracker's error shape: `{"fault_message": "..."}`.
    pub fn fault(status: u16, message: impl std::fmt::Display) -> Response {
        let body = serde_json::json!({ "fault_message": message.to_string() }).to_string();
        Response { status, body: Some(body), content_type: JSON }
    }

    /// The bytes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            204 => "No Content",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Payload Too Large",
            431 => "Request Header Fields Too Large",
            500 => "Internal Server Error",
            501 => "Not Implemented",
            503 => "Service Unavailable",
            505 => "HTTP Version Not Supported",
            _ => "Unknown",
        };
        let mut out = format!("HTTP/1.1 {} {}\r\nServer: shoal-vmm\r\n", self.status, reason);
        match &self.body {
            Some(b) => out.push_str(&format!(
                "Content-Type: {}\r\nContent-Length: {}\r\n\r\n{}",
                self.content_type,
                b.len(),
                b
            )),
            None => out.push_str("Content-Length: 0\r\n\r\n"),
        }
        out.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_put_with_a_body_parses_and_reports_its_length() {
        let raw = b"PUT /machine-config HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{\"vcpu_count\": 2}GET";
        let (req, used) = parse(raw).unwrap().unwrap();
        assert_eq!(
            (req.method.as_str(), req.path.as_str(), req.body.as_slice(), req.close),
            ("PUT", "/machine-config", &b"{\"vcpu_count\": 2}"[..], false)
        );
        assert_eq!(&raw[used..], b"GET", "pipelined bytes are left for the next request");
    }

    #[test]
    fn partial_requests_ask_for_more() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        assert_eq!(parse(b"PUT /x HTTP/1.1\r\nContent-Length: 10\r\n\r\n{\"a\""), Ok(None));
    }

    #[test]
    fn hostile_requests_are_refused_with_a_status() {
        let cases: Vec<(&[u8], u16)> = vec![
            (b"GET /\r\n\r\n", 400),
            (b"get / HTTP/1.1\r\n\r\n", 400),
            (b"GET nopath HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/2.0\r\n\r\n", 505),
            (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", 400),
            (b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
            (b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n", 400),
            (b"PUT / HTTP/1.1\r\nContent-Length: 51201\r\n\r\n", 413),
            (b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
            (b"GET / HTTP/1.1 extra\r\n\r\n", 400),
            (b"\xff\xfe / HTTP/1.1\r\n\r\n", 400),
        ];
        for (raw, status) in cases {
            let err = parse(raw).unwrap_err();
            assert_eq!(err.status(), status, "{:?} -> {err}", String::from_utf8_lossy(raw));
        }
        let huge = vec![b'a'; MAX_HEAD + 1];
        assert_eq!(parse(&huge).unwrap_err().status(), 431);
    }

    #[test]
    fn responses_carry_length_and_fault_messages() {
        let r = Response::fault(400, "bad \"thing\"").to_bytes();
        let text = String::from_utf8(r).unwrap();
        assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(text.ends_with("{\"fault_message\":\"bad \\\"thing\\\"\"}"));
        assert!(text.contains("Content-Length: 33\r\n"), "{text}");
        assert_eq!(
            Response::no_content().to_bytes(),
            b"HTTP/1.1 204 No Content\r\nServer: shoal-vmm\r\nContent-Length: 0\r\n\r\n"
        );
    }
}
