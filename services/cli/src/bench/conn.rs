//! One bench connection: HTTP/1.1, one request at a time, on the worker's own task.
//!
//! The load generator shares the machine with the server it measures, so every microsecond it
//! spends is one the server does not get. A general client (hyper) drives each connection on a
//! task of its own and hands every request and answer across a channel; here the worker writes
//! the request with one `write` from a reused buffer and parses the answer in place with
//! `httparse`, which took the bench's user-space CPU per request to about a third.

use httparse::Status;
use std::io::{Error, ErrorKind};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest wait for one TCP connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Headers an answer may carry.
const MAX_HEADERS: usize = 64;
/// Largest answer head accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest answer body accepted (the server's bodies are far smaller).
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Most bytes one answer may occupy in the buffer, framing included (chunk sizes, trailers).
const MAX_ANSWER_BYTES: usize = 2 * MAX_BODY_BYTES;
/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 16 * 1024;
/// The response header carrying the session token.
const SESSION_HEADER: &str = "x-meridian-session";

/// An answer, read whole so that the connection can carry the next request.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The session token, when asked for and present.
    pub session: Option<String>,
    /// The body, when asked for (or when the status is not a success).
    pub body: Vec<u8>,
}

impl Answer {
    /// A 2xx answer.
    pub fn is_success(&self) -> bool {
        is_success(self.status)
    }
}

fn is_success(status: u16) -> bool {
    (200..300).contains(&status)
}

/// The methods the bench sends (neither expects an answer without a body, as HEAD would).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `GET`.
    Get,
    /// `PUT`.
    Put,
}

impl Method {
    fn as_bytes(self) -> &'static [u8] {
        match self {
            Method::Get => b"GET",
            Method::Put => b"PUT",
        }
    }
}

/// What of an answer the caller keeps beyond its status.
#[derive(Debug, Clone, Copy)]
pub struct Keep {
    /// Keep the `X-Meridian-Session` header.
    pub session: bool,
    /// Keep the body of a successful answer (a failure's body is always kept).
    pub body: bool,
}

impl Keep {
    /// Status only (failures keep their body): the measured loop.
    pub const STATUS: Keep = Keep {
        session: false,
        body: false,
    };
}

/// How an answer's body ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(usize),
    Chunked,
    UntilClose,
}

/// What the head of an answer says.
#[derive(Debug)]
struct Head {
    len: usize,
    status: u16,
    framing: Framing,
    close: bool,
    session: Option<String>,
}

/// A client connection to one server.
#[derive(Debug)]
pub struct Connection {
    stream: TcpStream,
    /// The request being written, reused.
    out: Vec<u8>,
    /// Bytes read and not yet consumed.
    buf: Vec<u8>,
    /// The server closes (or closed) the connection after the last answer.
    closed: bool,
}

impl Connection {
    /// Connects to `addr`, with Nagle off: requests are small and sequential.
    pub async fn open(addr: SocketAddr) -> std::io::Result<Self> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                Error::new(
                    ErrorKind::TimedOut,
                    format!("no connection within {CONNECT_TIMEOUT:?}"),
                )
            })??;
        stream.set_nodelay(true)?;
        Ok(Connection {
            stream,
            out: Vec::with_capacity(1024),
            buf: Vec::with_capacity(READ_CHUNK),
            closed: false,
        })
    }

    /// The server said it closes the connection: open a new one for the next request.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Sends `{method} {path} HTTP/1.1`, then `rest` (pre-rendered header lines, the blank
    /// line and any body), and reads the whole answer. After an error the connection is closed.
    pub async fn exchange(
        &mut self,
        method: Method,
        path: &[u8],
        rest: &[&[u8]],
        keep: Keep,
    ) -> std::io::Result<Answer> {
        self.out.clear();
        self.out.extend_from_slice(method.as_bytes());
        self.out.push(b' ');
        self.out.extend_from_slice(path);
        self.out.extend_from_slice(b" HTTP/1.1\r\n");
        for part in rest {
            self.out.extend_from_slice(part);
        }
        let answer = match self.stream.write_all(&self.out).await {
            Ok(()) => self.read_answer(keep).await,
            Err(error) => Err(error),
        };
        // Whatever is left of a broken answer would be read as the next one's.
        self.closed |= answer.is_err();
        answer
    }

    /// Reads the answer to the request just sent.
    async fn read_answer(&mut self, keep: Keep) -> std::io::Result<Answer> {
        let head = loop {
            if let Some(head) = parse_head(&self.buf, keep.session)? {
                // An interim answer (1xx) is followed by the real one.
                if (100..200).contains(&head.status) {
                    self.buf.drain(..head.len);
                    continue;
                }
                break head;
            }
            if self.buf.len() >= MAX_HEAD_BYTES {
                return Err(invalid("answer head larger than 64 KiB"));
            }
            self.fill().await?;
        };
        self.closed |= head.close;
        let keep_body = keep.body || !is_success(head.status);
        let body = self.body(&head, keep_body).await?;
        Ok(Answer {
            status: head.status,
            session: head.session,
            body,
        })
    }

    /// Reads the body `head` announces and consumes the answer from the buffer.
    async fn body(&mut self, head: &Head, keep: bool) -> std::io::Result<Vec<u8>> {
        let start = head.len;
        let (end, body) = match head.framing {
            Framing::Empty => (start, Vec::new()),
            Framing::Length(length) => {
                if length > MAX_BODY_BYTES {
                    return Err(invalid("answer body larger than 16 MiB"));
                }
                let end = start + length;
                while self.buf.len() < end {
                    self.fill().await?;
                }
                let body = if keep {
                    self.buf[start..end].to_vec()
                } else {
                    Vec::new()
                };
                (end, body)
            }
            Framing::Chunked => self.chunked(start, keep).await?,
            Framing::UntilClose => {
                while self.read_some().await? > 0 {
                    if self.buf.len() - start > MAX_BODY_BYTES {
                        return Err(invalid("answer body larger than 16 MiB"));
                    }
                }
                self.closed = true;
                let body = if keep {
                    self.buf[start..].to_vec()
                } else {
                    Vec::new()
                };
                (self.buf.len(), body)
            }
        };
        // One request is in flight at a time, so nothing may follow its answer.
        if self.buf.len() > end {
            return Err(invalid("unexpected bytes after the answer"));
        }
        self.buf.clear();
        Ok(body)
    }

    /// Decodes a chunked body starting at `pos`; returns where the answer ends, and the body.
    async fn chunked(&mut self, mut pos: usize, keep: bool) -> std::io::Result<(usize, Vec<u8>)> {
        let mut body = Vec::new();
        let mut total = 0usize;
        loop {
            let (consumed, size) = match httparse::parse_chunk_size(&self.buf[pos..]) {
                Ok(Status::Complete(found)) => found,
                Ok(Status::Partial) => {
                    self.fill().await?;
                    continue;
                }
                Err(_) => return Err(invalid("malformed chunk size")),
            };
            let size = usize::try_from(size)
                .ok()
                .filter(|size| total.saturating_add(*size) <= MAX_BODY_BYTES)
                .ok_or_else(|| invalid("answer body larger than 16 MiB"))?;
            pos += consumed;
            if size == 0 {
                // Optional trailer lines, then the blank line.
                loop {
                    match find_crlf(&self.buf[pos..]) {
                        Some(0) => return Ok((pos + 2, body)),
                        Some(line) => pos += line + 2,
                        None => self.fill().await?,
                    }
                }
            }
            while self.buf.len() < pos + size + 2 {
                self.fill().await?;
            }
            if &self.buf[pos + size..pos + size + 2] != b"\r\n" {
                return Err(invalid("chunk not followed by CRLF"));
            }
            if keep {
                body.extend_from_slice(&self.buf[pos..pos + size]);
            }
            total += size;
            pos += size + 2;
        }
    }

    /// Reads more bytes; the connection ending here is an error.
    async fn fill(&mut self) -> std::io::Result<()> {
        match self.read_some().await? {
            0 => {
                self.closed = true;
                Err(Error::new(
                    ErrorKind::UnexpectedEof,
                    "connection closed before the answer ended",
                ))
            }
            _ => Ok(()),
        }
    }

    async fn read_some(&mut self) -> std::io::Result<usize> {
        if self.buf.len() >= MAX_ANSWER_BYTES {
            return Err(invalid("answer larger than 32 MiB"));
        }
        self.buf.reserve(READ_CHUNK);
        self.stream.read_buf(&mut self.buf).await
    }
}

/// Parses an answer head, `None` until it is complete.
fn parse_head(buf: &[u8], want_session: bool) -> std::io::Result<Option<Head>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let len = match response.parse(buf) {
        Ok(Status::Complete(len)) => len,
        Ok(Status::Partial) => return Ok(None),
        Err(e) => return Err(invalid(&format!("malformed answer head: {e}"))),
    };
    let status = response.code.unwrap_or(0);
    let mut length = None;
    let mut chunked = false;
    let mut close = response.version == Some(0);
    let mut session = None;
    for header in response.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("content-length") {
            let value = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| invalid("malformed Content-Length"))?;
            if length.is_some_and(|l| l != value) {
                return Err(invalid("conflicting Content-Length headers"));
            }
            length = Some(value);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = last_token(header.value).eq_ignore_ascii_case(b"chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            for token in header.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    close = false;
                }
            }
        } else if want_session && name.eq_ignore_ascii_case(SESSION_HEADER) {
            session = std::str::from_utf8(header.value).ok().map(str::to_owned);
        }
    }
    let framing = if matches!(status, 100..=199 | 204 | 304) {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(length) => Framing::Length(length),
            None => Framing::UntilClose,
        }
    };
    Ok(Some(Head {
        len,
        status,
        framing,
        close,
        session,
    }))
}

/// The last comma-separated token of a header value, trimmed.
fn last_token(value: &[u8]) -> &[u8] {
    let token = value.rsplit(|b| *b == b',').next().unwrap_or(value);
    token.trim_ascii()
}

fn find_crlf(bytes: &[u8]) -> Option<usize> {
    bytes.windows(2).position(|w| w == b"\r\n")
}

fn invalid(message: &str) -> Error {
    Error::new(ErrorKind::InvalidData, message.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Serves `answers` in order, one per request read, writing each in pieces of `piece`
    /// bytes; returns the requests it read.
    async fn server(
        answers: Vec<&'static [u8]>,
        piece: usize,
    ) -> (SocketAddr, tokio::task::JoinHandle<Vec<Vec<u8>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut requests = Vec::new();
            for answer in answers {
                requests.push(read_request(&mut socket).await);
                for part in answer.chunks(piece) {
                    socket.write_all(part).await.expect("write");
                    socket.flush().await.expect("flush");
                    tokio::task::yield_now().await;
                }
            }
            requests
        });
        (addr, task)
    }

    /// Reads one request: its head, then as many body bytes as its Content-Length says.
    async fn read_request(socket: &mut tokio::net::TcpStream) -> Vec<u8> {
        let mut request = Vec::new();
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut parsed = httparse::Request::new(&mut headers);
            if let Ok(Status::Complete(head)) = parsed.parse(&request) {
                let length = parsed
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                    .unwrap_or(0);
                if request.len() >= head + length {
                    return request;
                }
            }
            let mut chunk = [0u8; 4096];
            let n = socket.read(&mut chunk).await.expect("read");
            assert!(n > 0, "client closed early");
            request.extend_from_slice(&chunk[..n]);
        }
    }

    const KEEP_ALL: Keep = Keep {
        session: true,
        body: true,
    };

    #[tokio::test]
    async fn answers_of_every_framing_are_read_whole_even_in_one_byte_pieces() {
        let answers: Vec<&'static [u8]> = vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-meridian-session: tok\r\n\r\nhello",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nx-trailer: 1\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy",
            b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil close",
        ];
        for piece in [1, 7, 4096] {
            let (addr, server) = server(answers.clone(), piece).await;
            let mut conn = Connection::open(addr).await.expect("connect");
            let put = conn
                .exchange(
                    Method::Put,
                    b"/v1/kv/b/k1",
                    &[b"Host: h\r\nContent-Length: 2\r\n\r\n", b"{}"],
                    KEEP_ALL,
                )
                .await
                .expect("length-framed answer");
            assert_eq!((put.status, put.body.as_slice()), (200, &b"hello"[..]));
            assert_eq!(put.session.as_deref(), Some("tok"));
            let chunked = conn
                .exchange(Method::Get, b"/a", &[b"Host: h\r\n\r\n"], KEEP_ALL)
                .await
                .expect("chunked answer");
            assert_eq!(
                (chunked.status, chunked.body.as_slice()),
                (200, &b"abcde"[..])
            );
            assert_eq!(chunked.session, None);
            let empty = conn
                .exchange(Method::Get, b"/b", &[b"Host: h\r\n\r\n"], KEEP_ALL)
                .await
                .expect("empty answer");
            assert_eq!((empty.status, empty.body.len()), (204, 0));
            let failure = conn
                .exchange(Method::Get, b"/c", &[b"Host: h\r\n\r\n"], Keep::STATUS)
                .await
                .expect("failure answer");
            assert_eq!(
                (failure.status, failure.body.as_slice()),
                (503, &b"busy"[..])
            );
            assert!(!conn.is_closed());
            let last = conn
                .exchange(Method::Get, b"/d", &[b"Host: h\r\n\r\n"], KEEP_ALL)
                .await
                .expect("answer ended by close");
            assert_eq!(last.body, b"until close");
            assert!(conn.is_closed());
            let requests = server.await.expect("server");
            assert_eq!(
                requests[0],
                b"PUT /v1/kv/b/k1 HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n{}"
            );
            assert_eq!(requests[1], b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n");
        }
    }

    /// One status-only GET answered with `answer`: the connection after it, and the outcome.
    async fn one_get(answer: &'static [u8]) -> (Connection, std::io::Result<Answer>) {
        let (addr, _server) = server(vec![answer], 4096).await;
        let mut conn = Connection::open(addr).await.expect("connect");
        let outcome = conn
            .exchange(Method::Get, b"/", &[b"\r\n"], Keep::STATUS)
            .await;
        (conn, outcome)
    }

    #[tokio::test]
    async fn success_bodies_are_skipped_unless_kept() {
        let (_, answer) = one_get(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc").await;
        let answer = answer.expect("answer");
        assert_eq!((answer.status, answer.body.len()), (200, 0));
    }

    #[tokio::test]
    async fn broken_answers_are_errors_not_hangs() {
        let broken: [&'static [u8]; 4] = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
            b"NOT HTTP\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        ];
        for answer in broken {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("addr");
            tokio::spawn(async move {
                let (mut socket, _) = listener.accept().await.expect("accept");
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let _ = socket.write_all(answer).await;
                // Closing ends a short body with EOF instead of waiting forever.
            });
            let mut conn = Connection::open(addr).await.expect("connect");
            let result = tokio::time::timeout(
                Duration::from_secs(5),
                conn.exchange(Method::Get, b"/", &[b"\r\n"], KEEP_ALL),
            )
            .await
            .expect("no hang");
            assert!(
                result.is_err(),
                "{:?} was accepted",
                String::from_utf8_lossy(answer)
            );
        }
    }

    #[tokio::test]
    async fn close_among_connection_tokens_and_any_error_end_the_connection() {
        let (conn, answer) =
            one_get(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close, x-other\r\n\r\n")
                .await;
        assert_eq!(answer.expect("answer").status, 200);
        assert!(conn.is_closed(), "`close` among other tokens");

        let (conn, failed) = one_get(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").await;
        assert!(failed.is_err());
        assert!(
            conn.is_closed(),
            "a failed exchange leaves nothing to reuse"
        );
    }
}
