//! Raw-socket upstreams and raw HTTP/1.1 helpers, for broken peers and exact
//! bytes: a handler per accepted connection that reads and writes by hand.
//!
//! ```no_run
//! use testkit::{raw_upstream, read_head, write_all};
//!
//! # async fn example() {
//! // Answers with a malformed status line.
//! let upstream = raw_upstream(|mut s| async move {
//!     let _ = read_head(&mut s).await;
//!     write_all(&mut s, b"HTTP/1.1 abc\r\n\r\n").await;
//! })
//! .await;
//! # drop(upstream);
//! # }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::wait::{AbortOnDrop, within};

/// An upstream that hands each accepted TCP connection to a handler that
/// reads and writes bytes by hand. Stops accepting when dropped.
pub struct RawUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    _task: AbortOnDrop,
}

impl RawUpstream {
    /// The URL to give the proxy as `--upstream`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// Starts a [`RawUpstream`]: `handler` runs once per connection, e.g.
/// `raw_upstream(|s| hang(s))` or `raw_upstream(|mut s| async move { ... })`.
pub async fn raw_upstream<H, F>(handler: H) -> RawUpstream
where
    H: Fn(TcpStream) -> F + Send + Sync + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(handler(stream));
        }
    });
    RawUpstream {
        addr,
        connections,
        _task: AbortOnDrop(task),
    }
}

/// Raw handler: reads the request head, then holds the connection open
/// without ever answering.
pub async fn hang(mut stream: TcpStream) {
    let _ = read_head(&mut stream).await;
    std::future::pending::<()>().await;
    drop(stream);
}

/// Raw handler: reads the request head, then closes the connection without
/// sending a byte (a reset before response headers).
pub async fn close_after_head(mut stream: TcpStream) {
    let _ = read_head(&mut stream).await;
}

/// Reads an HTTP/1 message head up to and including the blank line, one
/// byte at a time so that nothing after it is consumed. `None` if the peer
/// closed (or failed) before the head was complete.
pub async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// Reads one CRLF-terminated line (without the CRLF).
async fn read_line<S: AsyncRead + Unpin>(stream: &mut S) -> Option<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => line.push(byte[0]),
            _ => return None,
        }
    }
    line.truncate(line.len() - 2);
    Some(String::from_utf8_lossy(&line).into_owned())
}

/// The request target (second word of the request line) of a raw head.
pub fn request_target(head: &str) -> &str {
    head.split_whitespace().nth(1).unwrap_or("")
}

/// The first value of header `name` in a raw head (case-insensitive).
pub fn head_header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A response read from a raw socket.
#[derive(Debug, Clone)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// The head as received (status line and headers).
    pub head: String,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        head_header(&self.head, name)
    }

    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body_text()))
    }

    /// The body as text.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads one response: head, then a body by `content-length`, chunked
/// encoding, or until EOF. A `1xx` or `204`/`304` response has no body.
/// `None` if the connection closed before a complete head.
pub async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> Option<RawResponse> {
    let head = read_head(stream).await?;
    let status: u16 = head.split_whitespace().nth(1)?.parse().ok()?;
    let mut body = Vec::new();
    if (100..200).contains(&status) || status == 204 || status == 304 {
    } else if let Some(len) = head_header(&head, "content-length") {
        body.resize(len.parse().ok()?, 0);
        stream.read_exact(&mut body).await.ok()?;
    } else if head_header(&head, "transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let line = read_line(stream).await?;
            let size = usize::from_str_radix(line.split(';').next()?.trim(), 16).ok()?;
            if size == 0 {
                while !read_line(stream).await?.is_empty() {}
                break;
            }
            let start = body.len();
            body.resize(start + size, 0);
            stream.read_exact(&mut body[start..]).await.ok()?;
            read_line(stream).await?;
        }
    } else {
        stream.read_to_end(&mut body).await.ok()?;
    }
    Some(RawResponse { status, head, body })
}

/// Opens a TCP connection, writes `request` as is, and reads one response.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> RawResponse {
    within("raw exchange", async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request).await.expect("write request");
        read_response(&mut stream)
            .await
            .expect("a complete response before the connection closed")
    })
    .await
}

/// Writes `bytes` and flushes.
pub async fn write_all<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) {
    stream.write_all(bytes).await.expect("write");
    stream.flush().await.expect("flush");
}

/// Reads until the peer closes the connection (EOF or reset) and returns
/// what was read; bounded by [`WAIT`](crate::WAIT).
pub async fn read_until_closed<S: AsyncRead + Unpin>(stream: &mut S) -> Vec<u8> {
    within("peer to close the connection", async {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
}

/// An address on which nothing listens (bound, then released: a tiny race,
/// acceptable in tests).
pub fn unused_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}
