//! A small headless Chromium driver for tests, speaking the Chrome DevTools Protocol (CDP)
//! over WebSocket.
//!
//! [`Browser::launch`] starts `/usr/bin/chromium` (or `$PIXIU_CHROMIUM`) headless, with a fresh
//! profile and the flags that stop it from reaching out to the network, and reads the
//! `DevTools listening on ws://...` line it prints on stderr. [`Browser::new_page`] opens a tab
//! ([`Page`]) with its own DevTools connection, which can [`Page::navigate`], [`Page::eval`]
//! JavaScript, [`Page::wait_for`] a condition, and take a [`Page::screenshot`].
//!
//! Every wait has a deadline. Chromium (its whole process group: renderers, zygote, GPU
//! process) is killed when the [`Browser`] is dropped, and its profile deleted.

use std::collections::VecDeque;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Where Chromium is installed (`scripts/prereqs.sh` installs it); `$PIXIU_CHROMIUM` overrides.
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// How long Chromium may take to start, and to answer one DevTools command.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a navigation may take until the page's `load` event.
const LOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How often [`Page::wait_for`] evaluates its condition.
const POLL: Duration = Duration::from_millis(50);
/// Events kept while waiting for a reply (only the newest are needed).
const MAX_EVENTS: usize = 256;

/// A headless Chromium, killed (with every process it started) when dropped.
pub struct Browser {
    child: Child,
    log_path: PathBuf,
    /// `127.0.0.1:<port>` of the DevTools endpoint.
    debugger: String,
    conn: Mutex<Cdp>,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium headless with a fresh profile; its stderr goes to
    /// `<log_dir>/chromium.log`. Waits (up to 30 s) for its DevTools endpoint.
    pub async fn launch(log_dir: &Path) -> anyhow::Result<Browser> {
        let bin = std::env::var_os("PIXIU_CHROMIUM")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(CHROMIUM));
        if !bin.is_file() {
            bail!(
                "Chromium not found at {} (scripts/prereqs.sh installs it; PIXIU_CHROMIUM overrides the path)",
                bin.display()
            );
        }
        let profile = tempfile::Builder::new()
            .prefix("pixiu-chromium-")
            .tempdir()
            .context("creating a Chromium profile folder")?;
        let log_path = log_dir.join("chromium.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let child = Command::new(&bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-breakpad",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--mute-audio",
                "--window-size=1280,900",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            // its own process group, so that drop can kill every process Chromium started
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        // From here on, dropping `browser` kills Chromium, also when starting fails.
        let mut browser = Browser {
            child,
            log_path,
            debugger: String::new(),
            conn: Mutex::new(Cdp::unconnected()),
            _profile: profile,
        };
        let ws_url = browser.devtools_url().await?;
        browser.debugger = ws_url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .ok_or_else(|| anyhow!("unexpected DevTools address {ws_url}"))?
            .to_string();
        browser.conn = Mutex::new(
            Cdp::connect(&ws_url)
                .await
                .context("connecting to Chromium's DevTools")?,
        );
        Ok(browser)
    }

    /// Polls the log for `DevTools listening on ws://...`.
    async fn devtools_url(&mut self) -> anyhow::Result<String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let log = self.log();
            if let Some(url) = log
                .lines()
                .find_map(|l| l.trim().strip_prefix("DevTools listening on "))
            {
                return Ok(url.trim().to_string());
            }
            if let Some(status) = self.child.try_wait().context("waiting for Chromium")? {
                bail!(
                    "Chromium exited ({status}) before its DevTools endpoint was up; log:\n{}",
                    tail(&log, 30)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "Chromium printed no DevTools address within {START_TIMEOUT:?}; log:\n{}",
                    tail(&log, 30)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Everything Chromium wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Opens a new tab on `about:blank`, with its own DevTools connection.
    pub async fn new_page(&self) -> anyhow::Result<Page> {
        let target = self
            .conn
            .lock()
            .await
            .call("Target.createTarget", json!({ "url": "about:blank" }))
            .await
            .context("opening a tab")?;
        let id = target["targetId"]
            .as_str()
            .ok_or_else(|| anyhow!("Target.createTarget answered {target}"))?;
        let url = format!("ws://{}/devtools/page/{id}", self.debugger);
        let mut conn = Cdp::connect(&url)
            .await
            .with_context(|| format!("connecting to the tab at {url}"))?;
        conn.call("Page.enable", json!({})).await?;
        Ok(Page {
            conn: Mutex::new(conn),
        })
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole process group: the browser and every renderer, zygote and helper.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill")
            .args(["-s", "KILL", "--", &group])
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One tab.
pub struct Page {
    conn: Mutex<Cdp>,
}

impl Page {
    /// Loads `url` and waits (up to 30 s) for its `load` event. A navigation that only
    /// changes the fragment returns once it is done.
    pub async fn navigate(&self, url: &str) -> anyhow::Result<()> {
        let mut conn = self.conn.lock().await;
        conn.events.clear();
        let r = conn
            .call("Page.navigate", json!({ "url": url }))
            .await
            .with_context(|| format!("navigating to {url}"))?;
        if let Some(err) = r["errorText"].as_str().filter(|e| !e.is_empty()) {
            bail!("navigating to {url}: {err}");
        }
        if r.get("loaderId").is_some() {
            conn.wait_event("Page.loadEventFired", Instant::now() + LOAD_TIMEOUT)
                .await
                .with_context(|| format!("loading {url}"))?;
        }
        Ok(())
    }

    /// Evaluates `js` in the page (awaiting it if it is a promise) and returns its value as
    /// JSON (`null` for `undefined`). A thrown exception is an error.
    pub async fn eval(&self, js: &str) -> anyhow::Result<Value> {
        let r = self
            .conn
            .lock()
            .await
            .call(
                "Runtime.evaluate",
                json!({
                    "expression": js,
                    "returnByValue": true,
                    "awaitPromise": true,
                    "userGesture": true,
                }),
            )
            .await?;
        if let Some(ex) = r.get("exceptionDetails") {
            let what = ex["exception"]["description"]
                .as_str()
                .or_else(|| ex["text"].as_str())
                .unwrap_or("an exception");
            bail!("evaluating `{js}`: {what}");
        }
        Ok(r["result"].get("value").cloned().unwrap_or(Value::Null))
    }

    /// Evaluates `condition` every 50 ms until it is truthy. After `timeout`, an error with
    /// its last value (or exception) and the page's visible text.
    pub async fn wait_for(&self, condition: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let js = format!("Boolean({condition})");
        let mut last = "never evaluated".to_string();
        loop {
            match tokio::time::timeout_at(deadline, self.eval(&js)).await {
                Ok(Ok(Value::Bool(true))) => return Ok(()),
                Ok(Ok(v)) => last = v.to_string(),
                Ok(Err(e)) => last = format!("{e:#}"),
                Err(_) => {} // cut off by the deadline: keep the previous answer
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        let text = self
            .eval("document.body ? document.body.innerText : ''")
            .await
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        bail!(
            "waiting for `{condition}`: still not true after {timeout:?} (last: {last});\n\
             --- the page shows ---\n{}",
            truncate(&text, 4000)
        )
    }

    /// `element.textContent` of the first element matching the CSS `selector`.
    pub async fn text(&self, selector: &str) -> anyhow::Result<String> {
        let v = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({s}); \
                 if (!e) throw new Error('no element ' + {s}); return e.textContent; }})()",
                s = js_string(selector)
            ))
            .await?;
        Ok(v.as_str().unwrap_or_default().to_string())
    }

    /// Sets the value of the input matching `selector` (firing `input` and `change`).
    pub async fn fill(&self, selector: &str, value: &str) -> anyhow::Result<()> {
        self.eval(&format!(
            "(() => {{ const e = document.querySelector({s}); \
             if (!e) throw new Error('no element ' + {s}); e.value = {v}; \
             e.dispatchEvent(new Event('input', {{ bubbles: true }})); \
             e.dispatchEvent(new Event('change', {{ bubbles: true }})); }})()",
            s = js_string(selector),
            v = js_string(value)
        ))
        .await
        .map(drop)
    }

    /// Clicks the element matching `selector` (an error if it is missing or disabled).
    pub async fn click(&self, selector: &str) -> anyhow::Result<()> {
        self.eval(&format!(
            "(() => {{ const e = document.querySelector({s}); \
             if (!e) throw new Error('no element ' + {s}); \
             if (e.disabled) throw new Error({s} + ' is disabled'); e.click(); }})()",
            s = js_string(selector)
        ))
        .await
        .map(drop)
    }

    /// Writes a PNG of the whole page (not only the window) to `path`; returns its size in
    /// bytes. Brings the tab to the front first: Chromium paints no frames for a background
    /// tab, so capturing one would wait forever.
    pub async fn screenshot(&self, path: &Path) -> anyhow::Result<usize> {
        let mut conn = self.conn.lock().await;
        conn.call("Page.bringToFront", json!({})).await?;
        let metrics = conn.call("Page.getLayoutMetrics", json!({})).await?;
        let size = &metrics["cssContentSize"];
        let (width, height) = (size["width"].as_f64(), size["height"].as_f64());
        let params = match (width, height) {
            (Some(width), Some(height)) if width >= 1.0 && height >= 1.0 => json!({
                "format": "png",
                "captureBeyondViewport": true,
                "clip": { "x": 0, "y": 0, "width": width, "height": height, "scale": 1 },
            }),
            _ => json!({ "format": "png" }),
        };
        let r = conn.call("Page.captureScreenshot", params).await?;
        let data = r["data"]
            .as_str()
            .ok_or_else(|| anyhow!("Page.captureScreenshot answered no data"))?;
        let png = base64_decode(data).context("decoding the screenshot")?;
        if !png.starts_with(b"\x89PNG\r\n\x1a\n") {
            bail!("the screenshot is not a PNG");
        }
        std::fs::write(path, &png).with_context(|| format!("writing {}", path.display()))?;
        Ok(png.len())
    }
}

/// One DevTools WebSocket connection: commands in order, events kept for
/// [`Cdp::wait_event`].
struct Cdp {
    ws: Option<WebSocketStream<MaybeTlsStream<TcpStream>>>,
    next_id: u64,
    events: VecDeque<Value>,
}

impl Cdp {
    fn unconnected() -> Cdp {
        Cdp {
            ws: None,
            next_id: 0,
            events: VecDeque::new(),
        }
    }

    async fn connect(url: &str) -> anyhow::Result<Cdp> {
        let (ws, _) = tokio::time::timeout(CALL_TIMEOUT, tokio_tungstenite::connect_async(url))
            .await
            .map_err(|_| anyhow!("no WebSocket handshake within {CALL_TIMEOUT:?}"))??;
        Ok(Cdp {
            ws: Some(ws),
            ..Cdp::unconnected()
        })
    }

    /// Sends `method` and waits (up to 30 s) for its result.
    async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        let deadline = Instant::now() + CALL_TIMEOUT;
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({ "id": id, "method": method, "params": params }).to_string();
        let ws = self.ws.as_mut().ok_or_else(|| anyhow!("not connected"))?;
        tokio::time::timeout_at(deadline, ws.send(Message::text(msg)))
            .await
            .map_err(|_| anyhow!("{method}: could not send within {CALL_TIMEOUT:?}"))?
            .with_context(|| format!("sending {method}"))?;
        loop {
            let v = self
                .read(deadline)
                .await
                .with_context(|| format!("waiting for the answer to {method}"))?;
            if v["id"].as_u64() == Some(id) {
                if let Some(err) = v.get("error") {
                    bail!("{method}: {err}");
                }
                return Ok(v.get("result").cloned().unwrap_or(Value::Null));
            }
            self.keep_event(v);
        }
    }

    /// The first event named `method`, kept or arriving before `deadline`.
    async fn wait_event(&mut self, method: &str, deadline: Instant) -> anyhow::Result<Value> {
        loop {
            if let Some(i) = self.events.iter().position(|e| e["method"] == method) {
                return self
                    .events
                    .remove(i)
                    .ok_or_else(|| anyhow!("event {i} vanished"));
            }
            let v = self
                .read(deadline)
                .await
                .with_context(|| format!("waiting for {method}"))?;
            self.keep_event(v);
        }
    }

    fn keep_event(&mut self, v: Value) {
        if v.get("method").is_some() {
            if self.events.len() >= MAX_EVENTS {
                self.events.pop_front();
            }
            self.events.push_back(v);
        }
    }

    /// The next JSON message, before `deadline`.
    async fn read(&mut self, deadline: Instant) -> anyhow::Result<Value> {
        let ws = self.ws.as_mut().ok_or_else(|| anyhow!("not connected"))?;
        loop {
            let msg = tokio::time::timeout_at(deadline, ws.next())
                .await
                .map_err(|_| anyhow!("nothing from Chromium before the deadline"))?
                .ok_or_else(|| anyhow!("Chromium closed the DevTools connection"))?
                .context("reading from Chromium's DevTools")?;
            match msg {
                Message::Text(text) => {
                    return serde_json::from_str(text.as_str())
                        .with_context(|| format!("DevTools sent no JSON: {}", text.as_str()));
                }
                Message::Close(frame) => {
                    bail!("Chromium closed the DevTools connection: {frame:?}")
                }
                _ => {}
            }
        }
    }
}

/// `s` as a JavaScript string literal (JSON's quoting is valid JavaScript).
pub fn js_string(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

/// Standard base64 (with or without padding), as CDP sends binary data.
fn base64_decode(s: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            b'\r' | b'\n' => continue,
            _ => bail!("not base64: byte {c:#04x}"),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes() {
        let cases: [(&str, &[u8]); 5] = [
            ("", b""),
            ("aGVsbG8=", b"hello"),
            ("aGVsbG8", b"hello"),
            ("iVBORw0KGgo=", b"\x89PNG\r\n\x1a\n"),
            ("/+8A", &[0xff, 0xef, 0x00]),
        ];
        for (text, want) in cases {
            assert_eq!(base64_decode(text).expect("valid base64"), want, "{text}");
        }
        assert!(base64_decode("a*b").is_err());
    }

    #[test]
    fn js_strings_are_quoted() {
        assert_eq!(js_string("a'b\"c\n</script>"), r#""a'b\"c\n</script>""#);
    }
}
