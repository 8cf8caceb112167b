//! HTTP plumbing for the API: JSON responses and errors, bounded body reading, and serving a
//! blob file with `Range` and `ETag`.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::{header, Response, StatusCode};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncSeekExt, ReadBuf};

pub type ResBody = BoxBody<Bytes, io::Error>;

/// Largest JSON request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// An API error: a status and a message naming the problem, sent as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, m)
    }
    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, m)
    }
    pub fn internal(m: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("internal error: {m}"),
        )
    }
}

impl From<crate::db::Refusal> for ApiError {
    fn from(r: crate::db::Refusal) -> Self {
        match r {
            crate::db::Refusal::NotFound(m) => ApiError::not_found(m),
            crate::db::Refusal::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m),
            crate::db::Refusal::Db(e) => ApiError::internal(e),
        }
    }
}

impl From<rusqlite::Error> for ApiError {
    fn from(e: rusqlite::Error) -> Self {
        ApiError::internal(e)
    }
}

pub fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<ResBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-store")
        .body(
            Full::new(body.into())
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("valid response")
}

pub fn json<T: serde::Serialize>(status: StatusCode, v: &T) -> Response<ResBody> {
    let mut body = serde_json::to_vec_pretty(v).expect("serializable");
    body.push(b'\n');
    full(status, "application/json", body)
}

pub fn error(e: &ApiError) -> Response<ResBody> {
    json(
        e.status,
        &proto::v1::ErrorBody {
            error: e.message.clone(),
        },
    )
}

/// Reads a request body: at most [`MAX_BODY`] bytes within `timeout`. Every body is read
/// before the request is judged, so that a refusal is never a reset of a half-sent request.
pub async fn read_body(body: Incoming, timeout: Duration) -> Result<Bytes, ApiError> {
    let limited = Limited::new(body, MAX_BODY);
    let collected = tokio::time::timeout(timeout, limited.collect())
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request body not received in time",
            )
        })?
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("request body is over {MAX_BODY} bytes"),
                )
            } else {
                ApiError::bad_request(format!("reading request body: {e}"))
            }
        })?;
    Ok(collected.to_bytes())
}

/// Parses a JSON body; unknown fields and malformed JSON are refused with serde's message,
/// which names the field and position.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("request body: {e}")))
}

/// A byte range of a blob, inclusive.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub struct ByteRange {
    pub start: u64,
    pub end: u64,
}

/// Parses a `Range` header against a blob of `len` bytes (RFC 9110 §14.1.2). `Ok(None)`: serve
/// the whole blob (no header, or a form we do not serve partially: several ranges, another
/// unit). `Err`: unsatisfiable or malformed, answered with 416.
pub fn parse_range(h: Option<&str>, len: u64) -> Result<Option<ByteRange>, String> {
    let Some(h) = h else { return Ok(None) };
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec
        .split_once('-')
        .ok_or_else(|| format!("Range {h:?} is not bytes=START-END"))?;
    let num = |s: &str| {
        s.trim()
            .parse::<u64>()
            .map_err(|_| format!("Range {h:?} is not bytes=START-END"))
    };
    let r = match (a.trim().is_empty(), b.trim().is_empty()) {
        (true, true) => return Err(format!("Range {h:?} is empty")),
        // bytes=-N: the last N bytes.
        (true, false) => {
            let n = num(b)?;
            if n == 0 {
                return Err(format!("Range {h:?} asks for no bytes"));
            }
            ByteRange {
                start: len.saturating_sub(n),
                end: len.saturating_sub(1),
            }
        }
        (false, true) => ByteRange {
            start: num(a)?,
            end: len.saturating_sub(1),
        },
        (false, false) => {
            let (s, e) = (num(a)?, num(b)?);
            if e < s {
                return Err(format!("Range {h:?} ends before it starts"));
            }
            ByteRange {
                start: s,
                end: e.min(len.saturating_sub(1)),
            }
        }
    };
    if len == 0 || r.start >= len {
        return Err(format!(
            "Range {h:?} starts past the end of the {len}-byte blob"
        ));
    }
    Ok(Some(r))
}

/// Serves a file (an immutable, content-addressed blob): `ETag` is its hash, `Range` gives
/// 206 so that a cut download resumes where it stopped, `If-Range` with another tag gives
/// the whole file.
pub async fn serve_file(
    req: &hyper::http::request::Parts,
    path: &std::path::Path,
    etag: &str,
    counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Result<Response<ResBody>, ApiError> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| ApiError::internal(format!("opening {}: {e}", path.display())))?;
    let len = file
        .metadata()
        .await
        .map_err(|e| ApiError::internal(format!("reading {}: {e}", path.display())))?
        .len();
    let head = BlobHead::of(req, len, etag)?;
    if head.start > 0 {
        file.seek(io::SeekFrom::Start(head.start))
            .await
            .map_err(|e| ApiError::internal(format!("seeking {}: {e}", path.display())))?;
    }
    let body = FileBody {
        file,
        left: head.count,
        counter,
    }
    .boxed();
    Ok(head.respond(req, body))
}

/// What part of a blob of `len` bytes a request asks for, and the response's head for it.
pub struct BlobHead {
    pub start: u64,
    pub count: u64,
    builder: hyper::http::response::Builder,
}

impl BlobHead {
    pub fn of(
        req: &hyper::http::request::Parts,
        len: u64,
        etag: &str,
    ) -> Result<BlobHead, ApiError> {
        let quoted = format!("\"{etag}\"");
        let header_str = |n: header::HeaderName| req.headers.get(n).and_then(|v| v.to_str().ok());
        let mut range = parse_range(header_str(header::RANGE), len)
            .map_err(|m| ApiError::new(StatusCode::RANGE_NOT_SATISFIABLE, m))?;
        if header_str(header::IF_RANGE).is_some_and(|t| t != quoted) {
            range = None;
        }
        let (status, start, count) = match range {
            Some(r) => (StatusCode::PARTIAL_CONTENT, r.start, r.end - r.start + 1),
            None => (StatusCode::OK, 0, len),
        };
        let mut b = Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, count)
            .header(header::ACCEPT_RANGES, "bytes")
            .header(header::ETAG, &quoted)
            .header(
                header::CACHE_CONTROL,
                "private, max-age=31536000, immutable",
            );
        if let Some(r) = range {
            b = b.header(
                header::CONTENT_RANGE,
                format!("bytes {}-{}/{len}", r.start, r.end),
            );
        }
        Ok(BlobHead {
            start,
            count,
            builder: b,
        })
    }

    /// The response: `body` (which yields `count` bytes from `start`), none for HEAD.
    pub fn respond(self, req: &hyper::http::request::Parts, body: ResBody) -> Response<ResBody> {
        let body = if req.method == hyper::Method::HEAD {
            Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed()
        } else {
            body
        };
        self.builder.body(body).expect("valid response")
    }
}

/// Streams `left` bytes of a file in 256 KiB frames.
struct FileBody {
    file: tokio::fs::File,
    left: u64,
    counter: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Body for FileBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let n = self.left.min(256 * 1024) as usize;
        let mut buf = vec![0u8; n];
        let mut rb = ReadBuf::new(&mut buf);
        match Pin::new(&mut self.file).poll_read(cx, &mut rb) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Ready(Ok(())) => {
                let got = rb.filled().len();
                if got == 0 {
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "blob is shorter than it was",
                    ))));
                }
                buf.truncate(got);
                self.left -= got as u64;
                self.counter
                    .fetch_add(got as u64, std::sync::atomic::Ordering::Relaxed);
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(buf)))))
            }
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.left)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_rfc_9110() {
        let r = |h: &str| parse_range(Some(h), 1000);
        assert_eq!(
            r("bytes=0-99").unwrap(),
            Some(ByteRange { start: 0, end: 99 })
        );
        assert_eq!(
            r("bytes=900-").unwrap(),
            Some(ByteRange {
                start: 900,
                end: 999
            })
        );
        assert_eq!(
            r("bytes=-100").unwrap(),
            Some(ByteRange {
                start: 900,
                end: 999
            })
        );
        assert_eq!(
            r("bytes=990-5000").unwrap(),
            Some(ByteRange {
                start: 990,
                end: 999
            })
        );
        assert_eq!(r("bytes=0-1,5-6").unwrap(), None);
        assert_eq!(r("lines=1-2").unwrap(), None);
        for bad in [
            "bytes=1000-",
            "bytes=5-1",
            "bytes=a-b",
            "bytes=-0",
            "bytes=-",
            "bytes=../../etc",
        ] {
            assert!(r(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_range(None, 10).unwrap(), None);
    }
}
