//! A WebSocket client written out by hand, for what the real client (`pixiu-client`) is not
//! for: a member that stops reading its socket (the slow-client test), and a load generator
//! that finds a delivery's body with a byte scan instead of a JSON parse (the fan-out
//! benchmark). Only the client side of RFC 6455 that those need: the upgrade, masked frames
//! out, and the caller parses what comes back.

use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where `needle` starts in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

/// Read from `s` into `buf` until it holds `needle` (30 s at most); returns the index just
/// past it.
pub async fn read_until(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    needle: &[u8],
) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(30);
    // where the needle may start that was not searched yet
    let mut from = 0;
    loop {
        if let Some(i) = find(&buf[from..], needle) {
            return Ok(from + i + needle.len());
        }
        from = buf.len().saturating_sub(needle.len() - 1);
        anyhow::ensure!(
            Instant::now() < deadline,
            "timed out waiting for {:?}",
            String::from_utf8_lossy(needle)
        );
        let mut chunk = vec![0u8; 64 * 1024];
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut chunk)).await??;
        anyhow::ensure!(n > 0, "the server closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A client-to-server frame: FIN set, `opcode`, the payload masked (clients mask every
/// frame; the key need not be secret here).
pub fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x5a, 0xa5, 0x3c, 0xc3];
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Open `path` (e.g. `/v1/ws?token=..`) on the gateway at `addr`, upgrade, join `room` and
/// wait for `joined`. Returns the socket and the bytes read past the `joined` frame.
pub async fn connect_and_join(
    addr: &str,
    path: &str,
    room: u64,
) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: cGl4aXUtcmF3LWNsaWVudCE=\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    let end = read_until(&mut stream, &mut buf, b"\r\n\r\n").await?;
    anyhow::ensure!(
        buf.starts_with(b"HTTP/1.1 101"),
        "upgrade refused: {}",
        String::from_utf8_lossy(&buf[..end])
    );
    buf.drain(..end);
    let join = format!("{{\"op\":\"join\",\"room\":\"{room}\"}}");
    stream.write_all(&client_frame(1, join.as_bytes())).await?;
    let end = read_until(&mut stream, &mut buf, b"\"op\":\"joined\"").await?;
    // the rest of the `joined` frame is short and ends with its object's '}'
    let close = buf[end..]
        .iter()
        .position(|&b| b == b'}')
        .map_or(buf.len(), |i| end + i + 1);
    buf.drain(..close);
    Ok((stream, buf))
}
