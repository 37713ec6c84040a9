//! The web UI (`/ui/`) as a person uses it: a real headless Chromium (Debian's `chromium`),
//! driven over its DevTools protocol, against a real `host serve`.
//!
//! The test logs in through the form, browses the runs (filtered, paged), a failed run's
//! traceback and its trace, the aliases and an evaluation, follows the link to a changed run
//! and reads the diff off the page. Every page is checked for what guests and tenants wrote
//! into it (results, tracebacks, labels hold markup): shown as text, never as elements. Each
//! page's screenshot is written to `target/ui-screenshots/`.
//!
//! Without a Chromium the test fails, saying how to get one: `make test` installs it.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};
use tempfile::TempDir;
use tungstenite::{Message, WebSocket};

use crate::common::Fixture;
use crate::common::server::{Server, send, token, two_tenants, workdir};

/// Two versions of one notebook: the second changes `score`'s total. Both put markup in
/// what they return and raise, as any guest may.
fn notebook(factor: u32) -> Fixture {
    Fixture::code(&[&format!(
        r#"
def score(x):
    return {{"x": x, "total": x * {factor}, "note": '<i id="injected-result">guest</i>'}}

def fail(x):
    raise ValueError(f'bad <b id="injected-error">{{x}}</b>')
"#
    )])
}

#[test]
fn a_person_browses_runs_aliases_and_an_evaluation_and_reads_a_changed_runs_diff() {
    // First: without a browser the test fails at once, saying how to get one.
    let chromium = chromium();
    let dir = workdir();
    let (a_token, a_digest) = token("ui-a");
    let (b_token, b_digest) = token("ui-b");
    let config = two_tenants(dir.path(), &a_digest, &b_digest);
    let server = Server::start(&dir.path().join("data"), Some(&config));
    let backend = if server.db.is_some() {
        "postgres"
    } else {
        "sqlite"
    };

    // Tenant a: two versions, an alias moved twice, three calls through it.
    let label = r#"one <i id="injected-label">label</i>"#;
    let v1 = deploy(&server, &a_token, &notebook(2), label);
    let v2 = deploy(&server, &a_token, &notebook(3), "two");
    for version in [&v1, &v2] {
        server
            .put(
                "/v1/aliases/prod",
                Some(&a_token),
                json!({"version": version}).to_string().as_bytes(),
            )
            .expect(200);
    }
    server
        .put(
            "/v1/aliases/prod",
            Some(&a_token),
            json!({"version": v1}).to_string().as_bytes(),
        )
        .expect(200);
    let returned = run_id(&server.call(&a_token, "prod", "score", json!([2])), 200);
    let zero = run_id(&server.call(&a_token, "prod", "score", json!([0])), 200);
    let raised = run_id(&server.call(&a_token, "prod", "fail", json!([3])), 422);
    // Tenant b: a run and an evaluation of its own, which a must never see.
    let b_version = deploy(&server, &b_token, &notebook(2), "b's");
    let b_run = run_id(&server.call(&b_token, &b_version, "score", json!([5])), 200);

    // An evaluation of v2 against prod, as the evaluator stores one: `score(2)` changed,
    // `score(0)` newly failing, `fail(3)` the same.
    let evaluation = "01900000-0000-7000-8000-0000000000e1";
    execute(
        &server,
        &format!(
            "INSERT INTO evaluations (id, tenant, candidate, against, baseline, function,
             selection, tolerance, status, total, done, same, changed, newly_failing, fixed,
             not_replayable, created_at, finished_at, replica)
             VALUES ('{evaluation}', 'a', '{v2}', 'prod', '{v1}', NULL, '{{\"last\": 3}}', NULL,
             'done', 3, 3, 1, 1, 1, 0, 0, '2026-01-02T03:04:05.000Z',
             '2026-01-02T03:04:09.000Z', 'test')"
        ),
    );
    let changed = json!({
        "run": returned, "function": "score", "class": "changed",
        "recorded_version": v1, "recorded_at": "2026-01-02T03:00:00Z",
        "recorded": {"returned": {"x": 2, "total": 4, "note": "<i id=\"injected-result\">guest</i>"}},
        "candidate": {"returned": {"x": 2, "total": 6, "note": "<i id=\"injected-diff\">candidate</i>"}},
        "differences": [
            {"path": "result.total", "recorded": 4, "candidate": 6},
            {"path": "result.note", "recorded": "<i id=\"injected-result\">guest</i>",
             "candidate": "<i id=\"injected-diff\">candidate</i>"},
        ],
        "failure": null, "reason": null, "notes": [], "duration_ms": 12.5,
    });
    let traceback = "Traceback (most recent call last):\n  nb.ipynb, cell 1, line 3, in score\n    return 1 / x\nZeroDivisionError: division by zero";
    let failing = json!({
        "run": zero, "function": "score", "class": "newly_failing",
        "recorded_version": v1, "recorded_at": "2026-01-02T03:00:01Z",
        "recorded": {"returned": {"x": 0, "total": 0, "note": "guest"}},
        "candidate": {"raised": {"phase": "call", "type": "ZeroDivisionError",
            "message": "division by zero",
            "frames": [{"file": "nb.ipynb", "cell": 1, "line": 3, "function": "score",
                        "text": "return 1 / x"}]}},
        "differences": [], "failure": traceback, "reason": null, "notes": [],
        "duration_ms": 9.0,
    });
    let same = json!({"run": raised, "function": "fail", "class": "same", "differences": []});
    for (run, class, detail) in [
        (&returned, "changed", changed),
        (&zero, "newly_failing", failing),
        (&raised, "same", same),
    ] {
        execute(
            &server,
            &format!(
                "INSERT INTO evaluation_runs (evaluation, run, class, detail)
                 VALUES ('{evaluation}', '{run}', '{class}', {})",
                sql_text(&detail.to_string())
            ),
        );
    }
    let b_evaluation = "01900000-0000-7000-8000-0000000000b1";
    execute(
        &server,
        &format!(
            "INSERT INTO evaluations (id, tenant, candidate, against, selection, status,
             created_at) VALUES ('{b_evaluation}', 'b', '{b_version}', '{b_version}', '{{}}',
             'running', '2026-01-02T03:04:05.000Z')"
        ),
    );

    let mut browser = Browser::start(&chromium, backend);
    let ui = |path: &str| format!("{}{path}", server.url);

    // Without the cookie, every page leads to the login form; a wrong token is refused.
    browser.goto(&ui("/ui/runs"));
    assert_eq!(browser.path(), "/ui/login");
    browser.screenshot("login");
    browser.submit_login("not-a-token");
    assert_eq!(browser.status(), 401);
    assert!(browser.text("body").contains("No tenant has this token"));
    browser.submit_login(&a_token);
    assert_eq!(browser.path(), "/ui/runs");
    assert_eq!(
        browser.eval("document.cookie"),
        json!(""),
        "the token's cookie is HttpOnly: no script reads it"
    );

    // The runs: a's three, newest first, markup from the label shown as text.
    assert_eq!(
        browser.eval(
            "[...document.querySelectorAll('#runs a.run')].map(a => a.href.split('/').pop())"
        ),
        json!([raised, zero, returned])
    );
    browser.no_injected_elements();
    assert!(
        browser
            .text("#runs")
            .contains(r#"one <i id="injected-label">label</i>"#)
    );
    browser.screenshot("runs");
    // Filtering by outcome (the select submits itself), and paging after the newest.
    browser.navigate_by(
        "const s = document.querySelector('select[name=outcome]'); \
         s.value = 'raised'; s.dispatchEvent(new Event('change'))",
    );
    assert_eq!(
        browser.eval("location.search"),
        json!("?function=&version=&outcome=raised")
    );
    assert_eq!(browser.count("#runs tbody tr"), 1);
    browser.goto(&ui(&format!("/ui/runs?function=score&after={raised}")));
    assert_eq!(browser.count("#runs tbody tr"), 2);
    browser.goto(&ui(&format!("/ui/runs?after={returned}")));
    assert!(browser.text("main").contains("No runs."));

    // The failed run: its input from the trace, the traceback as text, the trace downloads.
    browser.goto(&ui("/ui/runs?outcome=raised"));
    browser.navigate_by("document.querySelector('#runs a.run').click()");
    assert_eq!(browser.path(), format!("/ui/runs/{raised}"));
    assert_eq!(
        serde_json::from_str::<Value>(&browser.text("#input")).unwrap(),
        json!({"args": [3], "kwargs": {}})
    );
    let traceback_text = browser.text("#traceback");
    assert!(
        traceback_text.contains(r#"ValueError: bad <b id="injected-error">3</b>"#)
            && traceback_text.contains("in fail"),
        "{traceback_text}"
    );
    browser.no_injected_elements();
    browser.screenshot("run-raised");
    // The link downloads the trace the API serves, with the browser's cookie (read from its
    // jar: the page's Content-Security-Policy lets no script fetch anything).
    let link = browser.eval("document.querySelector('#trace').getAttribute('href')");
    assert_eq!(link, json!(format!("/ui/runs/{raised}/trace")));
    let cookie = browser.cookie();
    let download = server.request(
        "GET",
        link.as_str().unwrap(),
        None,
        &[("Cookie", &cookie)],
        None,
    );
    assert_eq!(download.status, 200, "{}", download.text());
    // A filter the API would refuse, the page refuses too (an edited URL), saying why.
    for (query, says) in [
        ("after=garbage", "not a run id"),
        ("outcome=raise", "not one of"),
    ] {
        let refused = server.request(
            "GET",
            &format!("/ui/runs?{query}"),
            None,
            &[("Cookie", &cookie)],
            None,
        );
        assert_eq!(refused.status, 400, "{query}: {}", refused.text());
        assert!(refused.text().contains(says), "{query}: {}", refused.text());
    }
    let api = server.get(&format!("/v1/runs/{raised}/trace"), Some(&a_token));
    assert!(download.body.starts_with(b"host-trace/1\n") && download.body == api.body);
    // The cookie is for the UI only: the API still wants a bearer token.
    assert_eq!(
        server
            .request("GET", "/v1/runs", None, &[("Cookie", &cookie)], None)
            .status,
        401
    );
    browser.goto(&ui(&format!("/ui/runs/{returned}")));
    assert_eq!(
        serde_json::from_str::<Value>(&browser.text("#result")).unwrap()["total"],
        json!(4)
    );

    // Another tenant's run and evaluation do not exist for a.
    browser.goto(&ui(&format!("/ui/runs/{b_run}")));
    assert_eq!(browser.status(), 404);
    assert!(browser.text("main").contains("No run"));
    browser.goto(&ui(&format!("/ui/evaluations/{b_evaluation}")));
    assert_eq!(browser.status(), 404);
    browser.goto(&ui(&format!("/ui/runs/{b_run}/trace")));
    assert_eq!(browser.status(), 404);

    // The aliases: prod back at v1, its three moves newest first.
    browser.goto(&ui("/ui/aliases"));
    assert_eq!(browser.count("section.alias"), 1);
    assert_eq!(browser.count("table.history tbody tr"), 3);
    assert!(
        browser
            .text("section.alias p")
            .starts_with(&format!("Points at {}", &v1[..12]))
    );
    let newest_move = browser.text("table.history tbody tr");
    assert!(
        newest_move.contains(&v2[..12]) && newest_move.contains(&v1[..12]),
        "{newest_move}"
    );
    browser.no_injected_elements();
    browser.screenshot("aliases");

    // The evaluations: a's one; its page; the changed run's diff, reached by clicking.
    browser.goto(&ui("/ui/evaluations"));
    assert_eq!(browser.count("#evaluations tbody tr"), 1);
    browser.navigate_by("document.querySelector('#evaluations a.evaluation').click()");
    assert_eq!(browser.path(), format!("/ui/evaluations/{evaluation}"));
    let summary = browser.text("ul.summary");
    assert!(
        summary.contains("1 same")
            && summary.contains("1 changed")
            && summary.contains("1 newly failing"),
        "{summary}"
    );
    assert_eq!(browser.count("#changed .entry"), 1);
    assert_eq!(browser.count("#newly_failing .entry"), 1);
    assert!(
        browser
            .text("#newly_failing pre.traceback")
            .contains("ZeroDivisionError: division by zero")
    );
    assert!(browser.text("#same").contains(&raised));
    browser.no_injected_elements();
    browser.screenshot("evaluation");

    browser.navigate_by("document.querySelector('#changed a.run').click()");
    assert_eq!(
        browser.path(),
        format!("/ui/evaluations/{evaluation}/runs/{returned}")
    );
    let diff: Value = browser.eval(
        "[...document.querySelectorAll('table.diff tbody tr')].map(tr => \
         [...tr.querySelectorAll('td')].map(td => td.textContent.trim()))",
    );
    assert_eq!(
        diff,
        json!([
            ["result.total", "4", "6"],
            [
                "result.note",
                r#""<i id=\"injected-result\">guest</i>""#,
                r#""<i id=\"injected-diff\">candidate</i>""#
            ],
        ])
    );
    let recorded: Value = serde_json::from_str(&browser.text("#recorded-outcome")).unwrap();
    let candidate: Value = serde_json::from_str(&browser.text("#candidate-outcome")).unwrap();
    assert_eq!(
        (recorded["total"].clone(), candidate["total"].clone()),
        (json!(4), json!(6))
    );
    browser.no_injected_elements();
    browser.screenshot("evaluation-changed-run");
    browser.navigate_by("[...document.querySelectorAll('a')].find(a => a.textContent === 'the production run').click()");
    assert_eq!(browser.path(), format!("/ui/runs/{returned}"));

    // Logging out forgets the cookie.
    browser.navigate_by("document.querySelector('nav form button').click()");
    assert_eq!(browser.path(), "/ui/login");
    browser.goto(&ui("/ui/aliases"));
    assert_eq!(browser.path(), "/ui/login");
}

/// Deploys a fixture's notebook with a label; returns the version.
fn deploy(server: &Server, token: &str, fixture: &Fixture, label: &str) -> String {
    let path = format!(
        "/v1/bundles?name=nb.ipynb&label={}",
        label
            .bytes()
            .map(|b| format!("%{b:02X}"))
            .collect::<String>()
    );
    let answer = server.post(
        &path,
        Some(token),
        &std::fs::read(&fixture.notebook).unwrap(),
    );
    assert!(
        answer.status == 201 || answer.status == 200,
        "deploy: {}",
        answer.text()
    );
    answer.json()["version"].as_str().unwrap().to_owned()
}

/// A call's run id, once its status is checked.
fn run_id(answer: &crate::common::server::Answer, status: u16) -> String {
    assert_eq!(answer.status, status, "{}", answer.text());
    answer
        .header("host-run")
        .expect("a Host-Run header")
        .to_owned()
}

/// Runs a statement that writes, on whichever store the server has.
fn execute(server: &Server, sql: &str) {
    match &server.db {
        Some(db) => {
            db.query(sql);
        }
        None => {
            let conn = rusqlite::Connection::open(server.data.join("host.db")).unwrap();
            conn.busy_timeout(Duration::from_secs(10)).unwrap();
            conn.execute_batch(sql).unwrap();
        }
    }
}

/// A string as an SQL literal.
fn sql_text(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// How long a page may take to load, and Chromium to start.
const WAIT: Duration = Duration::from_secs(30);

/// Headless Chromium with one page, driven over the DevTools protocol: navigations, script
/// evaluated in the page, screenshots. Killed when dropped.
struct Browser {
    child: Child,
    socket: WebSocket<TcpStream>,
    next_id: u64,
    /// Screenshots are named `BACKEND-PAGE.png`, so the two backends' runs do not collide.
    prefix: &'static str,
    _profile: TempDir,
}

/// Where Chromium is: `HOST_TEST_CHROMIUM`, else `chromium` (Debian's) or
/// `chromium-browser` on the PATH. Without one the test fails, saying how to get one.
fn chromium() -> PathBuf {
    let how = "install Debian's (`apt-get install chromium`; `make test` does it), or set \
               HOST_TEST_CHROMIUM to one";
    if let Some(path) = std::env::var_os("HOST_TEST_CHROMIUM") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "HOST_TEST_CHROMIUM is `{}`, which is not a file: {how}",
            path.display()
        );
        return path;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!("the UI test needs a headless Chromium and found none on the PATH: {how}");
}

impl Browser {
    fn start(binary: &Path, prefix: &'static str) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(binary)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-sync",
                "--hide-scrollbars",
                "--mute-audio",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {}: {e}", binary.display()));
        // Chromium says where its DevTools listen on stderr; the rest of stderr is drained,
        // so a full pipe never blocks it.
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find("ws://") {
                    let _ = tx.send(line[at..].to_owned());
                }
            }
        });
        let Ok(browser_url) = rx.recv_timeout(WAIT) else {
            let _ = child.kill();
            panic!("{} did not say where its DevTools listen", binary.display());
        };
        let address = browser_url
            .strip_prefix("ws://")
            .and_then(|rest| rest.split('/').next())
            .unwrap()
            .to_owned();
        let targets = send(
            &format!("http://{address}"),
            "GET",
            "/json/list",
            None,
            &[],
            None,
        )
        .expect("Chromium's target list")
        .json();
        let page = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .unwrap_or_else(|| panic!("Chromium has no page: {targets}"));
        let url = page["webSocketDebuggerUrl"].as_str().unwrap();
        let stream = TcpStream::connect(&address).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let (socket, _) = tungstenite::client(url, stream).expect("DevTools WebSocket");
        let mut browser = Browser {
            child,
            socket,
            next_id: 0,
            prefix,
            _profile: profile,
        };
        browser.call("Page.enable", json!({}));
        browser
    }

    /// Sends one DevTools command and returns its result, skipping the events in between.
    fn call(&mut self, method: &str, params: Value) -> Value {
        let reply = self.send(method, params);
        assert!(reply.get("error").is_none(), "{method}: {reply}");
        reply["result"].clone()
    }

    /// Sends one DevTools command and returns the whole reply, an error included.
    fn send(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let message = json!({"id": id, "method": method, "params": params}).to_string();
        self.socket.send(Message::text(message)).unwrap();
        loop {
            let message = self
                .socket
                .read()
                .unwrap_or_else(|e| panic!("DevTools, waiting for {method}: {e}"));
            let Message::Text(text) = message else {
                continue;
            };
            let reply: Value = serde_json::from_str(&text).unwrap();
            if reply["id"] == id {
                return reply;
            }
        }
    }

    /// The value of a script expression in the page.
    /// A script that starts a navigation, or one sent while a page is being left, may have
    /// its page replaced under it: then its value is null, and callers that wait for a page
    /// ask again.
    fn eval(&mut self, expression: &str) -> Value {
        let reply = self.send(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        );
        if let Some(error) = reply.get("error") {
            let message = error["message"].as_str().unwrap_or_default();
            assert!(
                message.contains("navigated or closed") || message.contains("context"),
                "Runtime.evaluate of `{expression}`: {reply}"
            );
            return Value::Null;
        }
        let result = reply["result"].clone();
        if let Some(e) = result.get("exceptionDetails") {
            panic!("`{expression}` threw: {e}");
        }
        result["result"]["value"].clone()
    }

    /// Runs a script that leaves the page (a click, a submit) and waits until the next page
    /// has loaded: the mark set on this page's window is gone with it.
    fn navigate_by(&mut self, script: &str) {
        self.eval("window.hostStale = true");
        self.eval(script);
        self.wait_loaded();
    }

    fn goto(&mut self, url: &str) {
        self.eval("window.hostStale = true");
        self.call("Page.navigate", json!({"url": url}));
        self.wait_loaded();
    }

    fn wait_loaded(&mut self) {
        let started = Instant::now();
        while self.eval("window.hostStale === undefined && document.readyState === 'complete'")
            != json!(true)
        {
            assert!(
                started.elapsed() < WAIT,
                "the page did not load: {}",
                self.eval("location.href")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The UI's cookie as a `Cookie` header gives it, once its attributes are checked: kept
    /// from scripts, from other sites' requests, and from the API's paths.
    fn cookie(&mut self) -> String {
        let cookies = self.call("Network.getCookies", json!({}));
        let cookie = cookies["cookies"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "host_token")
            .unwrap_or_else(|| panic!("no host_token cookie: {cookies}"))
            .clone();
        assert_eq!(
            (&cookie["httpOnly"], &cookie["sameSite"], &cookie["path"]),
            (&json!(true), &json!("Strict"), &json!("/ui")),
            "{cookie}"
        );
        format!("host_token={}", cookie["value"].as_str().unwrap())
    }

    /// Fills the login form and submits it.
    fn submit_login(&mut self, token: &str) {
        self.navigate_by(&format!(
            "document.querySelector('input[name=token]').value = {}; \
             document.querySelector('form.login').submit()",
            json!(token)
        ));
    }

    fn path(&mut self) -> String {
        self.eval("location.pathname").as_str().unwrap().to_owned()
    }

    /// The HTTP status of the page shown.
    fn status(&mut self) -> u64 {
        self.eval("performance.getEntriesByType('navigation')[0].responseStatus")
            .as_u64()
            .unwrap()
    }

    /// The text of the first element `selector` matches.
    fn text(&mut self, selector: &str) -> String {
        let text = self.eval(&format!(
            "(document.querySelector({0}) || {{}}).textContent",
            json!(selector)
        ));
        text.as_str()
            .unwrap_or_else(|| panic!("no `{selector}` on {}", self.eval("location.href")))
            .to_owned()
    }

    fn count(&mut self, selector: &str) -> u64 {
        self.eval(&format!(
            "document.querySelectorAll({}).length",
            json!(selector)
        ))
        .as_u64()
        .unwrap()
    }

    /// Asserts that none of the markup guests and tenants wrote became an element.
    fn no_injected_elements(&mut self) {
        assert_eq!(
            self.eval("document.querySelectorAll('[id^=injected]').length"),
            json!(0),
            "markup from a guest or a tenant became an element on {}",
            self.eval("location.href")
        );
    }

    /// Writes the page's screenshot to `target/ui-screenshots/PREFIX-NAME.png`.
    fn screenshot(&mut self, name: &str) {
        // The whole page, not only what the window shows.
        let size = self.call("Page.getLayoutMetrics", json!({}))["cssContentSize"].clone();
        let clip = json!({"x": 0, "y": 0, "width": size["width"], "height": size["height"],
                          "scale": 1});
        let shot = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "clip": clip, "captureBeyondViewport": true}),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        let dir = screenshots();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{}-{name}.png", self.prefix)), png).unwrap();
    }
}

/// `target/ui-screenshots`, beside the tests' own temporary folder.
fn screenshots() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("ui-screenshots")
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The same test on PostgreSQL: the UI's reads of both backends.
mod postgres {
    use crate::common::server::on_postgres;

    #[test]
    fn a_person_browses_runs_aliases_and_an_evaluation_and_reads_a_changed_runs_diff() {
        on_postgres(
            super::a_person_browses_runs_aliases_and_an_evaluation_and_reads_a_changed_runs_diff,
        )
    }
}
