//! A load generator's HTTP connection: one keep-alive HTTP/1.1 connection to a proxy, owned by
//! one publisher task, with hyper's client connection and no pool. The inbox benchmark uses it
//! where it measures how many publishes the cluster takes, so the generator, which shares the
//! cluster's two cores, spends as little of them as a lean client would: with reqwest (a pool,
//! URL parsing, a builder per request) the generator took about 53 % of a core at 13,800
//! msg/s, with this about 30 % at 15,300 msg/s (`top`, 1,024 publishers, 2026-12-03).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::Request;
use hyper_util::rt::TokioIo;
use pixiu_protocol::client::{BatchBody, BatchItem, BatchReply, BatchResult, Id, PublishBody};
use std::net::SocketAddr;

/// One keep-alive connection; a request at a time.
pub struct HttpConn {
    send: SendRequest<Full<Bytes>>,
    host: String,
    auth: String,
}

impl HttpConn {
    /// Connects to the proxy whose base URL is `http://host:port`, authorising every request
    /// with `token`.
    pub async fn connect(base_url: &str, token: &str) -> anyhow::Result<HttpConn> {
        let host = base_url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let addr: SocketAddr = host.parse()?;
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let (send, conn) = http1::handshake(TokioIo::new(tcp)).await?;
        // ends when the connection closes; a request on it then fails and says why
        tokio::spawn(conn);
        Ok(HttpConn {
            send,
            host,
            auth: format!("Bearer {token}"),
        })
    }

    /// `POST path` with a JSON `body`: the status and the answer's body.
    pub async fn post_json(&mut self, path: &str, body: Bytes) -> anyhow::Result<(u16, Bytes)> {
        self.send.ready().await?;
        let req = Request::post(path)
            .header("host", &self.host)
            .header("authorization", &self.auth)
            .header("content-type", "application/json")
            .body(Full::new(body))?;
        let resp = self.send.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    /// `POST /v1/users/{uid}/messages` of `body` from user 1: whether it was acknowledged
    /// (201).
    pub async fn send_user(&mut self, uid: u64, body: &str) -> anyhow::Result<bool> {
        let json = serde_json::to_vec(&PublishBody {
            body: body.to_string(),
            from: Some(Id(1)),
            sid: None,
            trace: false,
        })?;
        let (status, _) = self
            .post_json(&format!("/v1/users/{uid}/messages"), Bytes::from(json))
            .await?;
        Ok(status == 201)
    }

    /// `POST /v1/users/messages/batch` of one message from user 1 to each of `to`: how many
    /// were acknowledged.
    pub async fn send_batch(&mut self, to: &[u64], body: &str) -> anyhow::Result<usize> {
        let messages = to
            .iter()
            .map(|uid| BatchItem {
                to: Id(*uid),
                body: body.to_string(),
                from: Some(Id(1)),
                sid: None,
                trace: false,
            })
            .collect();
        let json = serde_json::to_vec(&BatchBody { messages })?;
        let (status, answer) = self
            .post_json("/v1/users/messages/batch", Bytes::from(json))
            .await?;
        match status {
            201 => Ok(to.len()),
            503 => {
                let reply: BatchReply = serde_json::from_slice(&answer)?;
                Ok(reply
                    .results
                    .iter()
                    .filter(|r| matches!(r, BatchResult::Stored { .. }))
                    .count())
            }
            _ => Ok(0),
        }
    }
}
