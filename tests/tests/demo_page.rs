//! The demo page (`GET /` on a gateway's client port) in a real headless Chromium against a
//! real `pixiu-ctl standalone`: two users in two tabs join a room, one publishes and the other
//! sees it, one sends a personal message and the other's inbox shows and acknowledges it.
//! Every assertion is on what the page's DOM shows. Screenshots of both tabs are written to
//! `<target>/debug/demo-page/`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pixiu_testkit::browser::{js_string, Browser, Page};
use pixiu_testkit::{bin_path, free_tcp_port};
use pixiu_tests::{assert_eventually, metric, wait_healthy, Proc, TestDir};
use std::path::PathBuf;
use std::time::Duration;

/// How long the page may take to show something.
const WAIT: Duration = Duration::from_secs(15);

const CONNECTED: &str = "document.querySelector('#status').dataset.state === 'connected'";

/// `pixiu-ctl standalone` as a child process, with its own ports and data dir.
struct Standalone {
    proc: Proc,
    dir: TestDir,
    /// `127.0.0.1:<port>`: the WebSocket and the demo page
    client: String,
}

impl Standalone {
    async fn start(name: &str, extra: &[&str]) -> Standalone {
        let dir = TestDir::new(name);
        let addr = || format!("127.0.0.1:{}", free_tcp_port());
        let (client, http, admin) = (addr(), addr(), addr());
        let data = dir.sub("data");
        let mut args: Vec<String> = vec![
            "standalone".into(),
            "--client-listen".into(),
            client.clone(),
            "--http".into(),
            http,
            "--admin".into(),
            admin.clone(),
            "--data-dir".into(),
            data.to_str().unwrap().into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut proc =
            Proc::spawn("standalone", &bin_path("pixiu-ctl"), &args, &[], dir.path()).unwrap();
        if let Err(e) = wait_healthy(&admin, Duration::from_secs(30)).await {
            panic!("the standalone is not healthy: {e}\n{}", proc.log());
        }
        assert!(proc.is_running(), "the standalone exited\n{}", proc.log());
        // a client publish goes gateway -> proxy -> broker: wait until the proxy routes
        assert_eventually(
            "the proxy routes to the broker",
            Duration::from_secs(20),
            || {
                let admin = admin.clone();
                async move {
                    let n = metric(&admin, "pixiu_peers{kind=\"broker_routable\"}")
                        .await
                        .map_err(|e| e.to_string())?;
                    if n >= 1.0 {
                        Ok(())
                    } else {
                        Err(format!("{n} broker replicas routable"))
                    }
                }
            },
        )
        .await;
        Standalone { proc, dir, client }
    }

    fn page_url(&self) -> String {
        format!("http://{}/", self.client)
    }

    /// A client token signed with the secret the standalone wrote to its data dir.
    fn token(&self, uid: u64) -> String {
        let secret = std::fs::read_to_string(self.dir.path().join("data/auth-secret")).unwrap();
        pixiu_protocol::auth::issue(secret.trim().as_bytes(), uid, Some("web"), false, 3600)
    }

    /// The last lines of its log, without terminal colours.
    fn log_tail(&self) -> String {
        let log = self.proc.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(30)..].join("\n");
        pixiu_testkit::strip_colours(&tail)
    }
}

/// Where the screenshots go: `<target>/debug/demo-page/`, kept after the test.
fn shot_dir() -> PathBuf {
    let dir = bin_path("pixiu-ctl")
        .parent()
        .expect("binaries are in a folder")
        .join("demo-page");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Waits for `condition` in `who`'s page; on timeout writes `<who>-failure.png` and panics
/// with what the page shows and the end of the cluster's log.
async fn expect(s: &Standalone, page: &Page, who: &str, condition: &str) {
    if let Err(e) = page.wait_for(condition, WAIT).await {
        let shot = shot_dir().join(format!("{who}-failure.png"));
        let shot = match page.screenshot(&shot).await {
            Ok(_) => shot.display().to_string(),
            Err(e) => format!("none: {e:#}"),
        };
        panic!(
            "{who}'s page: {e:#}\n(screenshot: {shot})\n--- standalone log (end) ---\n{}",
            s.log_tail()
        );
    }
}

async fn eval_str(page: &Page, js: &str) -> String {
    let v = page.eval(js).await.unwrap();
    v.as_str()
        .unwrap_or_else(|| panic!("`{js}` gave {v}, not a string"))
        .to_string()
}

/// The page's `#room-log` shows a line containing `text`.
fn room_log_has(text: &str) -> String {
    format!(
        "document.querySelector('#room-log').textContent.includes({})",
        js_string(text)
    )
}

/// The `#inbox-log` row of message `id`.
fn inbox_row(id: &str) -> String {
    format!(
        "document.querySelector({})",
        js_string(&format!("#inbox-log li[data-id=\"{id}\"]"))
    )
}

/// Sends a personal message from `page` and returns the id its `#send-result` shows.
async fn send_personal(s: &Standalone, page: &Page, who: &str, to: &str, body: &str) -> String {
    page.eval("delete document.querySelector('#send-result').dataset.id")
        .await
        .unwrap();
    page.fill("#to", to).await.unwrap();
    page.fill("#pbody", body).await.unwrap();
    page.click("#send").await.unwrap();
    expect(
        s,
        page,
        who,
        "document.querySelector('#send-result').dataset.id !== undefined",
    )
    .await;
    let id = eval_str(page, "document.querySelector('#send-result').dataset.id").await;
    assert!(
        !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()),
        "the sent id is a decimal string: {id:?}"
    );
    let shown = page.text("#send-result").await.unwrap();
    assert!(shown.contains(&id), "#send-result shows the id: {shown:?}");
    id
}

/// A screenshot of `page` at `<shot_dir>/<name>.png`, checked to be a real picture.
async fn screenshot(page: &Page, name: &str) -> PathBuf {
    let path = shot_dir().join(format!("{name}.png"));
    let size = page.screenshot(&path).await.unwrap();
    let png = std::fs::read(&path).unwrap();
    assert_eq!(png.len(), size);
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert!(
        size > 20_000 && width >= 800 && height >= 600,
        "{}: {size} bytes, {width}x{height}: too small for a rendered page",
        path.display()
    );
    println!(
        "screenshot of {name}'s page: {} ({size} bytes, {width}x{height})",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_chat_through_the_demo_page() {
    let s = Standalone::start("demo-page", &[]).await;
    let base = s.page_url();

    // the page itself, as the gateway serves it
    let resp = reqwest::get(&base).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    assert!(header("content-type").starts_with("text/html"), "{resp:?}");
    assert!(
        header("content-security-policy").contains("default-src 'none'"),
        "{resp:?}"
    );
    let html = resp.text().await.unwrap();
    assert!(html.contains("id=\"room-log\"") && html.contains("/v1/ws"));

    let browser = Browser::launch(s.dir.path()).await.unwrap();
    let one = browser.new_page().await.unwrap();
    let two = browser.new_page().await.unwrap();

    // uid 1: a token in the address's fragment connects at once
    one.navigate(&format!("{base}#token={}", s.token(1)))
        .await
        .unwrap();
    expect(&s, &one, "uid1", CONNECTED).await;
    let status = one.text("#status").await.unwrap();
    assert!(status.contains("uid 1"), "{status}");
    // uid 2: no token in the address; typed into the form
    two.navigate(&base).await.unwrap();
    assert_eq!(
        eval_str(&two, "document.querySelector('#status').dataset.state").await,
        "disconnected"
    );
    two.fill("#token", &s.token(2)).await.unwrap();
    two.click("#connect").await.unwrap();
    expect(&s, &two, "uid2", CONNECTED).await;
    let status = two.text("#status").await.unwrap();
    assert!(status.contains("uid 2"), "{status}");

    // both join room 42
    for (page, who) in [(&one, "uid1"), (&two, "uid2")] {
        page.fill("#room", "42").await.unwrap();
        page.click("#join").await.unwrap();
        expect(
            &s,
            page,
            who,
            "document.querySelector('#joined').dataset.rooms.split(' ').includes('42')",
        )
        .await;
    }

    // uid 1 publishes; uid 2's page shows it live, as text (not as HTML)
    let hello = r#"hello from uid 1 <img src=x onerror="document.title='pwned'"> & <b>bold?</b>"#;
    one.fill("#body", hello).await.unwrap();
    one.click("#publish").await.unwrap();
    // the publisher is a member too, so its own page shows the message first (and, if the
    // publish failed, the error frame that says why)
    expect(&s, &one, "uid1", &room_log_has(hello)).await;
    expect(&s, &two, "uid2", &room_log_has(hello)).await;
    let shown = eval_str(
        &two,
        "[...document.querySelectorAll('#room-log li')].map(li => li.textContent)\
         .find(t => t.includes('hello from uid 1'))",
    )
    .await;
    assert!(
        shown.contains("room 42") && shown.contains("uid 1"),
        "the room line names the room and the sender: {shown:?}"
    );
    assert_eq!(
        two.eval(
            "document.querySelector('#room-log img, #room-log b') === null \
             && document.title === 'PiXiu demo'"
        )
        .await
        .unwrap(),
        true,
        "the message body was not parsed as HTML"
    );

    // an error frame is shown with its code: publishing into a room not joined
    one.fill("#room", "43").await.unwrap();
    one.fill("#body", "nobody hears this").await.unwrap();
    one.click("#publish").await.unwrap();
    expect(
        &s,
        &one,
        "uid1",
        "document.querySelector('#event-log').textContent.includes('not_joined')",
    )
    .await;
    one.fill("#room", "42").await.unwrap();

    // uid 1 sends uid 2 a personal message; uid 2's inbox shows it with its id, and the page
    // acknowledges it (auto-ack is on by default)
    assert_eq!(
        two.eval("document.querySelector('#auto-ack').checked")
            .await
            .unwrap(),
        true
    );
    let first = send_personal(&s, &one, "uid1", "2", "a personal hello").await;
    let row = inbox_row(&first);
    expect(
        &s,
        &two,
        "uid2",
        &format!(
            "{row} && {row}.textContent.includes('a personal hello') \
             && {row}.textContent.includes('#{first}') && {row}.textContent.includes('uid 1')"
        ),
    )
    .await;
    expect(
        &s,
        &two,
        "uid2",
        &format!("{row}.classList.contains('acked')"),
    )
    .await;

    let shots = [
        screenshot(&one, "uid1").await,
        screenshot(&two, "uid2").await,
    ];

    // The ack reached the cluster: an unacknowledged message is delivered again on the
    // device's next connection, before anything newer. So uid 2 reconnects (a fresh page,
    // token in the query this time), gets a second message, and must not see the first.
    two.navigate(&format!("{base}?token={}", s.token(2)))
        .await
        .unwrap();
    expect(&s, &two, "uid2", CONNECTED).await;
    let second = send_personal(&s, &one, "uid1", "2", "a second hello").await;
    expect(&s, &two, "uid2", &inbox_row(&second)).await;
    assert_eq!(
        eval_str(
            &two,
            "[...document.querySelectorAll('#inbox-log li')].map(li => li.dataset.id).join(' ')"
        )
        .await,
        second,
        "after the reconnect only the new message arrives: the first ({first}) was acknowledged"
    );

    // with auto-ack off, a message waits for its own ack button
    two.click("#auto-ack").await.unwrap();
    let third = send_personal(&s, &one, "uid1", "2", "ack me by hand").await;
    let row = inbox_row(&third);
    expect(&s, &two, "uid2", &row).await;
    assert_eq!(
        two.eval(&format!("{row}.classList.contains('acked')"))
            .await
            .unwrap(),
        false
    );
    two.click(&format!("#inbox-log li[data-id=\"{third}\"] button"))
        .await
        .unwrap();
    expect(
        &s,
        &two,
        "uid2",
        &format!("{row}.classList.contains('acked')"),
    )
    .await;

    println!(
        "screenshots: {} and {}",
        shots[0].display(),
        shots[1].display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_auth_uid_from_the_address() {
    let s = Standalone::start("demo-devauth", &["--insecure-dev-auth"]).await;
    let browser = Browser::launch(s.dir.path()).await.unwrap();
    let page = browser.new_page().await.unwrap();
    page.navigate(&format!("{}?uid=5&dev=tab&room=7", s.page_url()))
        .await
        .unwrap();
    expect(&s, &page, "uid5", CONNECTED).await;
    let status = page.text("#status").await.unwrap();
    assert!(
        status.contains("uid 5") && status.contains("tab"),
        "{status}"
    );
    page.click("#join").await.unwrap();
    expect(
        &s,
        &page,
        "uid5",
        "document.querySelector('#joined').dataset.rooms === '7'",
    )
    .await;
    page.fill("#body", "dev auth works").await.unwrap();
    page.click("#publish").await.unwrap();
    expect(&s, &page, "uid5", &room_log_has("dev auth works")).await;
    let id = send_personal(&s, &page, "uid5", "5", "a note to myself").await;
    expect(
        &s,
        &page,
        "uid5",
        &format!("{}.classList.contains('acked')", inbox_row(&id)),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_false_turns_the_page_off() {
    let s = Standalone::start("demo-off", &["--demo", "false"]).await;
    let resp = reqwest::get(s.page_url()).await.unwrap();
    assert_eq!(resp.status().as_u16(), 404, "{resp:?}");
    // the gateway itself works: a client connects and joins a room
    let client = pixiu_client::Client::connect(
        &format!("ws://{}/v1/ws", s.client),
        &pixiu_client::Auth::Token(s.token(1)),
    )
    .await
    .unwrap();
    client.join(42).await.unwrap();
    client.close().await;
}

#[test]
fn the_page_is_one_self_contained_file() {
    let html = include_str!("../../gateway/src/demo.html");
    for outside in ["src=", "href=", "@import", "url(", "innerHTML", "outerHTML"] {
        assert!(!html.contains(outside), "demo.html contains {outside:?}");
    }
}
