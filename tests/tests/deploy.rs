//! The deploy files (`deploy/`), checked by the tools that consume them:
//!
//! - the systemd units by `systemd-analyze verify` (with `ExecStart` pointed at the binaries
//!   cargo built, since verify refuses a missing executable) and `systemd-analyze security`;
//! - the Kubernetes manifests by `kubernetes-validate` in strict mode, for a fixed version;
//! - the TOML examples by each binary's `--check-config`;
//! - the command lines of the units and of the manifests' containers by the same
//!   `--check-config`, so a misspelled flag or a missing `$(POD_IP)` fails here and not on a
//!   production host.
//!
//! Every check is also shown to reject a broken input (a misspelled directive, an unknown
//! field, an unknown key, a misspelled flag): a check that cannot fail proves nothing. Each
//! failure message carries the tool's whole output. No network is used.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pixiu_tests::TestDir;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.30.0";
/// `systemd-analyze security` exposure, in tenths (its scale is 0-100): 20 is "2.0 OK".
const MAX_EXPOSURE: &str = "20";
/// Where the units expect the binaries.
const INSTALL_DIR: &str = "/usr/local/bin/";
/// The service binaries, by role.
const ROLES: [&str; 6] = ["gateway", "proxy", "broker", "router", "xiu", "pi"];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .canonicalize()
        .expect("the deploy folder next to tests/")
}

/// Files directly in `dir` whose names end with one of `exts`, sorted.
fn files(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            exts.iter().any(|x| name.ends_with(x))
        })
        .collect();
    out.sort();
    out
}

/// Like [`files`], in every subfolder too.
fn files_recursive(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    let mut out = files(dir, exts);
    let mut subdirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    subdirs.sort();
    for d in subdirs {
        out.extend(files_recursive(&d, exts));
    }
    out
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

/// Run a tool; a missing tool fails the test (it is a prerequisite, not optional).
fn run_tool(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| {
        panic!(
            "cannot run {:?}: {e} (scripts/prereqs.sh test installs it)",
            cmd.get_program()
        )
    })
}

fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A tool's whole output, for failure messages.
fn output_text(cmd: &Command, out: &Output) -> String {
    format!(
        "$ {}\n{}\n--- stdout ---\n{}--- stderr ---\n{}",
        command_line(cmd),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ---------------------------------------------------------------------------------------
// systemd

/// Copy every unit of `from` into `to`, with each `/usr/local/bin/<name>` replaced by the
/// binary cargo built (verify refuses an `ExecStart` that does not exist). Returns the names
/// to verify: a template `x@.service` as its instance `x@0.service`.
fn stage_units(from: &Path, to: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for path in files(from, &[".service", ".target"]) {
        let name = file_name(&path);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(to.join(&name), point_at_built_binaries(&text)).unwrap();
        names.push(name.replace("@.service", "@0.service"));
    }
    assert!(
        !names.is_empty(),
        "no unit files in {}",
        from.to_string_lossy()
    );
    names
}

fn point_at_built_binaries(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find(INSTALL_DIR) {
        out.push_str(&rest[..i]);
        let after = &rest[i + INSTALL_DIR.len()..];
        let end = after.find(char::is_whitespace).unwrap_or(after.len());
        out.push_str(pixiu_testkit::bin_path(&after[..end]).to_str().unwrap());
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// `systemd-analyze verify` of one unit in `dir`: it must exit 0 and say nothing about our
/// units (it only warns about an unknown directive, and still exits 0 for some).
fn systemd_verify(dir: &Path, unit: &str) -> Result<String, String> {
    let mut cmd = Command::new("systemd-analyze");
    cmd.args([
        "verify",
        "--man=no",
        "--generators=no",
        "--recursive-errors=no",
    ])
    .arg(dir.join(unit))
    .current_dir(dir)
    .env("SYSTEMD_LOG_COLOR", "0");
    let out = run_tool(&mut cmd);
    let text = output_text(&cmd, &out);
    // every line about our units names them or the staging folder, both "pixiu-..."
    let complaints = String::from_utf8_lossy(&out.stdout)
        .lines()
        .chain(String::from_utf8_lossy(&out.stderr).lines())
        .filter(|l| l.contains("pixiu"))
        .count();
    if out.status.success() && complaints == 0 {
        Ok(text)
    } else {
        Err(format!(
            "systemd-analyze verify rejected {unit} ({complaints} line(s) about our units):\n{text}"
        ))
    }
}

/// `systemd-analyze security --offline`: the unit's exposure must stay at or below
/// [`MAX_EXPOSURE`] (the hardening directives are in place).
fn systemd_security(dir: &Path, unit: &str) -> Result<String, String> {
    let mut cmd = Command::new("systemd-analyze");
    cmd.args([
        "security",
        "--offline=yes",
        &format!("--threshold={MAX_EXPOSURE}"),
    ])
    .arg(dir.join(unit))
    .current_dir(dir)
    .env("SYSTEMD_LOG_COLOR", "0");
    let out = run_tool(&mut cmd);
    let text = output_text(&cmd, &out);
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "systemd-analyze security: {unit} is more exposed than {MAX_EXPOSURE}/100:\n{text}"
        ))
    }
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let dir = TestDir::new("deploy-units");
    let units = stage_units(&deploy_dir().join("systemd"), dir.path());
    for want in [
        "pixiu-broker@0.service",
        "pixiu-router@0.service",
        "pixiu-xiu@0.service",
        "pixiu-pi@0.service",
        "pixiu-gateway.service",
        "pixiu-proxy.service",
        "pixiu-probe.service",
    ] {
        assert!(
            units.iter().any(|u| u == want),
            "deploy/systemd has no unit for {want}: {units:?}"
        );
    }
    let mut failures = Vec::new();
    for unit in &units {
        if let Err(e) = systemd_verify(dir.path(), unit) {
            failures.push(e);
        }
        if unit.ends_with(".service") {
            if let Err(e) = systemd_security(dir.path(), unit) {
                failures.push(e);
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn systemd_checks_reject_a_broken_unit() {
    let dir = TestDir::new("deploy-units-bad");
    stage_units(&deploy_dir().join("systemd"), dir.path());
    let unit = dir.path().join("pixiu-broker@.service");
    let good = std::fs::read_to_string(&unit).unwrap();

    // a misspelled directive: systemd ignores it with a warning, which must fail the check
    assert!(good.contains("\nRestart=on-failure\n"));
    std::fs::write(
        &unit,
        good.replace("\nRestart=on-failure\n", "\nRestrat=on-failure\n"),
    )
    .unwrap();
    let err = systemd_verify(dir.path(), "pixiu-broker@0.service")
        .expect_err("systemd-analyze verify accepted a misspelled directive");
    assert!(err.contains("Restrat"), "{err}");
    eprintln!("rejected as expected:\n{err}");

    // the hardening removed: the exposure check must fail
    let start = good
        .find("DynamicUser=yes")
        .expect("the units use DynamicUser=");
    let end = good.find("[Install]").unwrap();
    assert!(start < end);
    std::fs::write(&unit, format!("{}{}", &good[..start], &good[end..])).unwrap();
    let err = systemd_security(dir.path(), "pixiu-broker@0.service")
        .expect_err("systemd-analyze security accepted a unit without hardening");
    eprintln!("rejected as expected:\n{err}");
}

/// The sample values of the variables the units take from their environment files.
const UNIT_ENV: [(&str, &str); 5] = [
    ("PIXIU_ZK", "192.0.2.1:2181"),
    ("PIXIU_LISTEN", "192.0.2.11:7200"),
    ("PIXIU_ADMIN", "192.0.2.11:9200"),
    ("PIXIU_CLIENT_URL", "ws://192.0.2.11:8700/v1/ws"),
    ("PIXIU_ARGS", ""),
];

/// The `ExecStart=` of a unit as systemd would run instance `0` of it, with the sample
/// environment and `/etc/pixiu/<role>.toml` replaced by `config_dir/<role>.toml`: the program
/// (still `/usr/local/bin/...`) and its arguments.
fn unit_command(text: &str, config_dir: &Path) -> Result<(String, Vec<String>), String> {
    let exec = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .ok_or("no ExecStart= line")?;
    if exec.contains(['"', '\'', '\\']) {
        return Err(format!(
            "ExecStart= uses quotes or escapes, which this test does not parse: {exec}"
        ));
    }
    let vars: BTreeMap<&str, &str> = UNIT_ENV.into_iter().collect();
    let mut words = Vec::new();
    for word in exec.split_whitespace() {
        if let Some(name) = word.strip_prefix('$').filter(|w| !w.starts_with('{')) {
            // $NAME on its own: split at whitespace, zero or more words
            let value = vars
                .get(name)
                .ok_or_else(|| format!("no sample value for ${name}"))?;
            words.extend(value.split_whitespace().map(str::to_string));
            continue;
        }
        let mut w = word
            .replace("%i", "0")
            .replace("%d", "/run/credentials/pixiu")
            .replace("%S", "/var/lib");
        for (name, value) in &vars {
            w = w.replace(&format!("${{{name}}}"), value);
        }
        if w.contains(['%', '$']) {
            return Err(format!(
                "ExecStart= word {word:?} has a specifier or variable this test does not know"
            ));
        }
        if let Some(f) = w
            .strip_prefix("/etc/pixiu/")
            .filter(|f| f.ends_with(".toml"))
        {
            w = config_dir.join(f).to_string_lossy().into_owned();
        }
        words.push(w);
    }
    let program = words.remove(0);
    Ok((program, words))
}

/// Run `program args... --check-config` (a workspace binary named by its install path or its
/// name) with no `PIXIU_*` variable but `env`; it must exit 0 and say the configuration is ok.
fn check_config(
    program: &str,
    args: &[String],
    env: &[(String, String)],
) -> Result<String, String> {
    let name = program.rsplit('/').next().unwrap();
    let mut cmd = Command::new(pixiu_testkit::bin_path(name));
    cmd.args(args).arg("--check-config");
    for var in [
        "PIXIU_ZK",
        "PIXIU_CLUSTER",
        "PIXIU_CONFIG",
        "PIXIU_AUTH_SECRET",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    let out = run_tool(&mut cmd);
    let text = output_text(&cmd, &out);
    let ok_line = format!("{name}: configuration ok");
    if out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&ok_line) {
        Ok(text)
    } else {
        Err(format!("{name} --check-config refused it:\n{text}"))
    }
}

#[test]
fn systemd_command_lines_pass_check_config() {
    let deploy = deploy_dir();
    let mut failures = Vec::new();
    let mut seen = BTreeSet::new();
    for path in files(&deploy.join("systemd"), &[".service"]) {
        let text = std::fs::read_to_string(&path).unwrap();
        let res = unit_command(&text, &deploy.join("config"))
            .and_then(|(program, args)| {
                seen.insert(program.clone());
                check_config(&program, &args, &[])
            })
            .map_err(|e| format!("{}: {e}", file_name(&path)));
        if let Err(e) = res {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    for role in ROLES {
        assert!(
            seen.contains(&format!("{INSTALL_DIR}pixiu-{role}")),
            "no unit runs pixiu-{role}: {seen:?}"
        );
    }
    assert!(
        seen.contains(&format!("{INSTALL_DIR}pixiu-ctl")),
        "no unit runs the probe: {seen:?}"
    );

    // a misspelled flag in a unit must be refused
    let text = std::fs::read_to_string(deploy.join("systemd/pixiu-xiu@.service")).unwrap();
    assert!(text.contains("--partition %i"));
    let bad = text.replace("--partition %i", "--partiton %i");
    let (program, args) = unit_command(&bad, &deploy.join("config")).unwrap();
    let err = check_config(&program, &args, &[]).expect_err("a misspelled flag was accepted");
    assert!(err.contains("partiton"), "{err}");
    eprintln!("rejected as expected:\n{err}");
}

// ---------------------------------------------------------------------------------------
// TOML examples

#[test]
fn toml_examples_pass_check_config() {
    let config = deploy_dir().join("config");
    let found: BTreeSet<String> = files(&config, &[".toml"])
        .iter()
        .map(|p| file_name(p))
        .collect();
    let want: BTreeSet<String> = ROLES.iter().map(|r| format!("{r}.toml")).collect();
    assert_eq!(
        found, want,
        "deploy/config must hold one TOML file per role"
    );
    let mut failures = Vec::new();
    for role in ROLES {
        let args = vec![
            "--config".to_string(),
            config.join(format!("{role}.toml")).to_string_lossy().into(),
        ];
        if let Err(e) = check_config(&format!("pixiu-{role}"), &args, &[]) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn check_config_rejects_an_unknown_toml_key() {
    let dir = TestDir::new("deploy-toml-bad");
    for role in ROLES {
        let good =
            std::fs::read_to_string(deploy_dir().join(format!("config/{role}.toml"))).unwrap();
        let bad = dir.path().join(format!("{role}.toml"));
        std::fs::write(&bad, format!("{good}\nno_such_key = 1\n")).unwrap();
        let args = vec!["--config".to_string(), bad.to_string_lossy().into()];
        let err = check_config(&format!("pixiu-{role}"), &args, &[])
            .expect_err("an unknown key was accepted");
        assert!(err.contains("no_such_key"), "{err}");
        // the contract: exit status 2 and a one-line reason on stderr
        assert!(err.contains("exit status: 2"), "{err}");
        let stderr = err.split("--- stderr ---\n").nth(1).unwrap();
        assert_eq!(stderr.trim_end().lines().count(), 1, "{err}");
        eprintln!("rejected as expected:\n{err}");
    }
}

// ---------------------------------------------------------------------------------------
// Kubernetes

/// `kubernetes-validate --strict` of `files`: exit 0, no warning or error, and every file
/// validated at least one resource (an empty or unreadable file proves nothing).
fn kubernetes_validate(files: &[PathBuf]) -> Result<String, String> {
    let mut cmd = Command::new("kubernetes-validate");
    cmd.args(["--strict", "-k", KUBERNETES_VERSION]).args(files);
    let out = run_tool(&mut cmd);
    let text = output_text(&cmd, &out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let mut problems: Vec<String> = stdout
        .lines()
        .chain(stderr.lines())
        .filter(|l| l.starts_with("WARN") || l.starts_with("ERROR"))
        .map(str::to_string)
        .collect();
    for f in files {
        let shown = f.to_string_lossy();
        if !stdout
            .lines()
            .any(|l| l.starts_with("INFO") && l.contains(&*shown) && l.contains(" passed "))
        {
            problems.push(format!("no resource of {shown} passed"));
        }
    }
    if out.status.success() && problems.is_empty() {
        Ok(text)
    } else {
        Err(format!(
            "kubernetes-validate (Kubernetes {KUBERNETES_VERSION}, strict) rejected the manifests:\n{}\n{text}",
            problems.join("\n")
        ))
    }
}

fn manifests() -> Vec<PathBuf> {
    let files = files_recursive(&deploy_dir().join("kubernetes"), &[".yaml", ".yml"]);
    assert!(!files.is_empty(), "no manifests in deploy/kubernetes");
    files
}

#[test]
fn kubernetes_manifests_pass_strict_validation() {
    if let Err(e) = kubernetes_validate(&manifests()) {
        panic!("{e}");
    }
}

#[test]
fn kubernetes_validate_rejects_an_unknown_field() {
    let dir = TestDir::new("deploy-k8s-bad");
    let good = std::fs::read_to_string(deploy_dir().join("kubernetes/30-broker-0.yaml")).unwrap();
    assert!(good.contains("\n  replicas: 2\n"));
    let bad = dir.path().join("broker.yaml");
    std::fs::write(
        &bad,
        good.replace("\n  replicas: 2\n", "\n  replicass: 2\n"),
    )
    .unwrap();
    let err = kubernetes_validate(&[bad]).expect_err("an unknown field was accepted");
    assert!(err.contains("replicass"), "{err}");
    eprintln!("rejected as expected:\n{err}");
}

/// Every document of the manifests, as JSON (PyYAML is there: kubernetes-validate needs it).
fn load_manifests(files: &[PathBuf]) -> Vec<Value> {
    const SCRIPT: &str = "import json, sys, yaml\n\
        docs = []\n\
        for f in sys.argv[1:]:\n\
        \x20   with open(f) as fh:\n\
        \x20       docs.extend(d for d in yaml.safe_load_all(fh) if d is not None)\n\
        json.dump(docs, sys.stdout)\n";
    let mut cmd = Command::new("python3");
    cmd.args(["-c", SCRIPT]).args(files);
    let out = run_tool(&mut cmd);
    assert!(
        out.status.success(),
        "reading the manifests with PyYAML failed:\n{}",
        output_text(&cmd, &out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A pod's IP as the downward API would give it.
const POD_IP: &str = "10.244.1.7";

/// What the test knows of one container of a workload.
struct Container {
    workload: String,
    role: String,
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    pod: Value,
    container: Value,
}

/// The containers of every Deployment, StatefulSet and Job, with their arguments as the
/// kubelet would expand them (`$(VAR)` from the container's env; an unknown one stays as it
/// is, as in Kubernetes) and the ConfigMap volumes written into `dir` (paths in the arguments
/// rewritten to point there).
fn containers(docs: &[Value], dir: &Path) -> Vec<Container> {
    let config_maps: BTreeMap<String, &Value> = docs
        .iter()
        .filter(|d| d["kind"] == "ConfigMap")
        .map(|d| (d["metadata"]["name"].as_str().unwrap().to_string(), d))
        .collect();
    let mut out = Vec::new();
    for d in docs {
        if !["Deployment", "StatefulSet", "Job"].contains(&d["kind"].as_str().unwrap_or("")) {
            continue;
        }
        let workload = format!(
            "{}/{}",
            d["kind"].as_str().unwrap(),
            d["metadata"]["name"].as_str().unwrap()
        );
        let pod = &d["spec"]["template"];
        let role = pod["metadata"]["labels"]["app.kubernetes.io/component"]
            .as_str()
            .unwrap_or_else(|| panic!("{workload}: no app.kubernetes.io/component label"))
            .to_string();
        // a StatefulSet's claim templates are volumes too (no configMap: nothing to stage)
        let volumes: Vec<Value> = pod["spec"]["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .cloned()
            .chain(
                d["spec"]["volumeClaimTemplates"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| serde_json::json!({ "name": t["metadata"]["name"] })),
            )
            .collect();
        for c in pod["spec"]["containers"].as_array().unwrap() {
            let mut env = Vec::new();
            for e in c["env"].as_array().cloned().unwrap_or_default() {
                let name = e["name"].as_str().unwrap().to_string();
                let value = if let Some(v) = e["value"].as_str() {
                    v.to_string()
                } else if e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP" {
                    POD_IP.to_string()
                } else if let Some(r) = e["valueFrom"]["configMapKeyRef"].as_object() {
                    let cm = config_maps
                        .get(r["name"].as_str().unwrap())
                        .unwrap_or_else(|| panic!("{workload}: no ConfigMap {}", r["name"]));
                    cm["data"][r["key"].as_str().unwrap()]
                        .as_str()
                        .unwrap_or_else(|| {
                            panic!("{workload}: no key {} in {}", r["key"], r["name"])
                        })
                        .to_string()
                } else {
                    continue; // not known to this test: stays unset
                };
                env.push((name, value));
            }
            let mut args: Vec<String> = c["command"]
                .as_array()
                .into_iter()
                .chain(c["args"].as_array())
                .flatten()
                .map(|a| a.as_str().unwrap().to_string())
                .collect();
            for a in &mut args {
                for (k, v) in &env {
                    *a = a.replace(&format!("$({k})"), v);
                }
            }
            for m in c["volumeMounts"].as_array().cloned().unwrap_or_default() {
                let vol = volumes
                    .iter()
                    .find(|v| v["name"] == m["name"])
                    .unwrap_or_else(|| panic!("{workload}: no volume {}", m["name"]));
                let Some(cm_name) = vol["configMap"]["name"].as_str() else {
                    continue;
                };
                let cm = config_maps
                    .get(cm_name)
                    .unwrap_or_else(|| panic!("{workload}: no ConfigMap {cm_name}"));
                let local = dir.join(cm_name);
                std::fs::create_dir_all(&local).unwrap();
                for (k, v) in cm["data"].as_object().unwrap() {
                    std::fs::write(local.join(k), v.as_str().unwrap()).unwrap();
                }
                let mount = m["mountPath"].as_str().unwrap();
                for a in &mut args {
                    *a = a.replace(mount, &local.to_string_lossy());
                }
            }
            let program = args.remove(0);
            out.push(Container {
                workload: workload.clone(),
                role: role.clone(),
                program,
                args,
                env,
                pod: pod.clone(),
                container: c.clone(),
            });
        }
    }
    out
}

/// The conventions every service container keeps: probes on `/healthz` of the admin port,
/// the Prometheus annotations on that port, resources, and a `--listen` on the pod's IP.
fn conventions(c: &Container) -> Vec<String> {
    let mut bad = Vec::new();
    // the probe serves its /metrics and /healthz on --serve and has no node-to-node port
    let probe = c.role == "probe";
    let admin_flag = if probe { "--serve=" } else { "--admin=" };
    let admin = c
        .args
        .iter()
        .find_map(|a| a.strip_prefix(admin_flag))
        .and_then(|a| a.rsplit(':').next())
        .map(str::to_string);
    let Some(admin) = admin else {
        return vec![format!("no {admin_flag}ADDR:PORT")];
    };
    if !probe
        && !c
            .args
            .iter()
            .any(|a| a.starts_with(&format!("--listen={POD_IP}:")))
    {
        bad.push("--listen is not the pod's IP ($(POD_IP) from status.podIP)".into());
    }
    let port_named = c.container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["containerPort"].as_u64().map(|n| n.to_string()).as_ref() == Some(&admin))
        .and_then(|p| p["name"].as_str())
        .map(str::to_string);
    for probe in ["readinessProbe", "livenessProbe"] {
        let get = &c.container[probe]["httpGet"];
        let port_ok = get["port"].as_u64().map(|n| n.to_string()).as_ref() == Some(&admin)
            || (port_named.is_some() && get["port"].as_str() == port_named.as_deref());
        if get["path"] != "/healthz" || !port_ok {
            bad.push(format!(
                "{probe} is not GET /healthz on the admin port {admin}"
            ));
        }
    }
    let ann = &c.pod["metadata"]["annotations"];
    if ann["prometheus.io/scrape"] != "true"
        || ann["prometheus.io/port"].as_str() != Some(admin.as_str())
        || ann["prometheus.io/path"] != "/metrics"
    {
        bad.push(format!(
            "the prometheus.io annotations do not scrape /metrics on {admin}: {ann}"
        ));
    }
    for kind in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            if c.container["resources"][kind][r].is_null() {
                bad.push(format!("no resources.{kind}.{r}"));
            }
        }
    }
    bad
}

#[test]
fn kubernetes_command_lines_pass_check_config() {
    let dir = TestDir::new("deploy-k8s-cmd");
    let docs = load_manifests(&manifests());
    let all = containers(&docs, dir.path());
    let mut failures = Vec::new();
    let mut partitions: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    let mut layout: BTreeMap<String, u32> = BTreeMap::new();
    for c in &all {
        if c.program.ends_with("/pixiu-ctl") && c.args.first().map(String::as_str) == Some("init") {
            // the init Job: its partition counts must match the workloads (checked below)
            for a in &c.args {
                if let Some((role, n)) = a
                    .strip_prefix("--")
                    .and_then(|a| a.split_once("-partitions="))
                {
                    layout.insert(role.to_string(), n.parse().unwrap());
                }
            }
            continue;
        }
        if let Some(p) = c.args.iter().find_map(|a| a.strip_prefix("--partition=")) {
            partitions
                .entry(c.role.clone())
                .or_default()
                .insert(p.parse().unwrap());
        }
        for b in conventions(c) {
            failures.push(format!("{} ({}): {b}", c.workload, c.role));
        }
        if let Err(e) = check_config(&c.program, &c.args, &c.env) {
            failures.push(format!("{}: {e}", c.workload));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    let roles: BTreeSet<&str> = all.iter().map(|c| c.role.as_str()).collect();
    for role in ROLES.iter().chain(&["probe"]) {
        assert!(roles.contains(role), "no workload runs {role}: {roles:?}");
    }
    let want: BTreeMap<String, BTreeSet<u32>> = layout
        .iter()
        .map(|(role, n)| (role.clone(), (0..*n).collect()))
        .collect();
    assert_eq!(
        partitions, want,
        "the partitions the workloads serve must be those `pixiu-ctl init` creates"
    );

    // a flag misspelled in a manifest must be refused
    let mut c = all
        .into_iter()
        .find(|c| c.role == "xiu")
        .expect("a xiu container");
    for a in &mut c.args {
        *a = a.replace("--data-dir=", "--data-dri=");
    }
    let err =
        check_config(&c.program, &c.args, &c.env).expect_err("a misspelled flag was accepted");
    assert!(err.contains("data-dri"), "{err}");
    eprintln!("rejected as expected:\n{err}");

    // and so must a pod that does not define POD_IP
    let mut c = containers(&docs, dir.path())
        .into_iter()
        .find(|c| c.role == "broker")
        .expect("a broker container");
    let unexpanded: Vec<String> = c
        .args
        .iter()
        .map(|a| a.replace(POD_IP, "$(POD_IP)"))
        .collect();
    c.args = unexpanded;
    let err =
        check_config(&c.program, &c.args, &c.env).expect_err("--listen=$(POD_IP) was accepted");
    eprintln!("rejected as expected:\n{err}");
}
