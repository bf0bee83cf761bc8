//! Flags and TOML settings common to every service binary (see the README's flag table).
//! A setting comes from, in increasing priority: its default, the `--config` TOML file, the
//! environment variable where there is one, the flag.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommonConfig {
    pub zk: Option<String>,
    pub cluster: String,
    pub listen: SocketAddr,
    pub admin: Option<SocketAddr>,
    pub tls_dir: Option<PathBuf>,
    pub zk_session_timeout_ms: u64,
    pub zk_refresh_ms: u64,
    /// How long a drain may take after SIGINT/SIGTERM.
    pub drain_ms: u64,
}

impl Default for CommonConfig {
    fn default() -> Self {
        CommonConfig {
            zk: None,
            cluster: "default".into(),
            listen: "127.0.0.1:0".parse().expect("literal address"),
            admin: None,
            tls_dir: None,
            zk_session_timeout_ms: 6000,
            zk_refresh_ms: 2000,
            drain_ms: 5000,
        }
    }
}

/// The flags of the replicated stores (`pixiu-xiu`, `pixiu-pi`), over their TOML settings.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct StoreArgs {
    /// Which partition this replica serves.
    #[arg(long)]
    pub partition: Option<u32>,
    /// Where RocksDB lives.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Followers that must hold a write before it is acknowledged (default 1).
    #[arg(long)]
    pub min_insync: Option<usize>,
    /// fsync the WAL before acknowledging (default true).
    #[arg(long)]
    pub fsync: Option<bool>,
}

impl StoreArgs {
    /// Overrides the settings the flags name.
    pub fn apply(
        self,
        partition: &mut u32,
        data_dir: &mut Option<PathBuf>,
        min_insync: &mut usize,
        fsync: &mut bool,
    ) {
        if let Some(v) = self.partition {
            *partition = v;
        }
        if self.data_dir.is_some() {
            *data_dir = self.data_dir;
        }
        if let Some(v) = self.min_insync {
            *min_insync = v;
        }
        if let Some(v) = self.fsync {
            *fsync = v;
        }
    }
}

/// The flags every service binary takes.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct CommonArgs {
    /// TOML file with any of the settings; flags override it.
    #[arg(long, env = "PIXIU_CONFIG")]
    pub config: Option<PathBuf>,
    /// ZooKeeper connect string, e.g. 127.0.0.1:2181.
    #[arg(long, env = "PIXIU_ZK")]
    pub zk: Option<String>,
    /// Cluster name; all its nodes live under /pixiu/NAME.
    #[arg(long, env = "PIXIU_CLUSTER")]
    pub cluster: Option<String>,
    /// Node-to-node UDP (QUIC) address; port 0 picks one.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Admin HTTP address: GET /healthz and /metrics.
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// Folder with ca.pem, node.pem, node.key for node-to-node QUIC.
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// ZooKeeper session timeout in milliseconds.
    #[arg(long)]
    pub zk_session_timeout_ms: Option<u64>,
    /// Check the settings (file and flags) and exit: 0 with "configuration ok", 2 with the
    /// reason. Connects nowhere and reads none of the files the settings name.
    #[arg(long)]
    pub check_config: bool,
}

impl CommonArgs {
    /// Overlay the flags on a config.
    pub fn apply(&self, c: &mut CommonConfig) {
        if let Some(v) = &self.zk {
            c.zk = Some(v.clone());
        }
        if let Some(v) = &self.cluster {
            c.cluster = v.clone();
        }
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = self.admin {
            c.admin = Some(v);
        }
        if let Some(v) = &self.tls_dir {
            c.tls_dir = Some(v.clone());
        }
        if let Some(v) = self.zk_session_timeout_ms {
            c.zk_session_timeout_ms = v;
        }
    }
}

/// What a service refuses in the common settings before it starts; `--check-config` runs the
/// same check. It connects nowhere and reads no file.
pub fn check_common(c: &CommonConfig) -> Result<(), crate::RuntimeError> {
    let err = |m: String| Err(crate::RuntimeError::Config(m));
    if c.listen.ip().is_unspecified() {
        // the bound address is what gets registered, and peers cannot connect to 0.0.0.0
        return err(format!(
            "--listen {} is a wildcard address; give the address peers should connect to",
            c.listen
        ));
    }
    if c.zk.as_deref().is_none_or(|z| z.trim().is_empty()) {
        return err("--zk (or PIXIU_ZK) is required".into());
    }
    if c.tls_dir.is_none() {
        return err(
            "--tls-dir is required (create one with `pixiu-ctl init --tls-dir DIR`)".into(),
        );
    }
    if c.cluster.is_empty() || c.cluster.contains('/') {
        return err(format!(
            "cluster name {:?} must be non-empty and have no '/'",
            c.cluster
        ));
    }
    if c.zk_session_timeout_ms == 0 {
        return err("zk_session_timeout_ms must be above 0".into());
    }
    Ok(())
}

/// The client-facing roles (gateway, proxy) need a secret to check tokens, or an explicit
/// `--insecure-dev-auth`; `role` names the role in the error.
pub fn check_auth(
    role: &str,
    secret: Option<&str>,
    secret_file: Option<&std::path::Path>,
    insecure_dev_auth: bool,
) -> Result<(), String> {
    if secret.is_none() && secret_file.is_none() && !insecure_dev_auth {
        return Err(format!(
            "the {role} needs --auth-secret-file (or PIXIU_AUTH_SECRET), or --insecure-dev-auth for development"
        ));
    }
    Ok(())
}

/// At start (not in `--check-config`, which reads no file): the secret of a client-facing
/// role must have been loaded unless `--insecure-dev-auth`, which is then warned about.
pub fn auth_loaded(
    role: &str,
    secret: Option<&str>,
    insecure_dev_auth: bool,
) -> Result<(), String> {
    if insecure_dev_auth {
        tracing::warn!(
            role,
            "--insecure-dev-auth: no token is needed; development only"
        );
        return Ok(());
    }
    match secret {
        Some(_) => Ok(()),
        None => Err(format!(
            "the {role}'s auth secret was not loaded (--auth-secret-file or PIXIU_AUTH_SECRET)"
        )),
    }
}

/// Settings with a floor: each `(key, value, least)` must have `value >= least`. The error
/// names the first that does not, as the config key (the flag is the same with dashes).
pub fn at_least(settings: &[(&str, u64, u64)]) -> Result<(), String> {
    match settings.iter().find(|(_, v, least)| v < least) {
        Some((key, v, least)) => Err(format!("{key} = {v} is below its least value, {least}")),
        None => Ok(()),
    }
}

/// `--check-config`: the common check, then the role's own; prints `<name>: configuration ok`
/// when both pass. The caller exits with the error (one line, status 2) otherwise.
pub fn report_check<E>(
    name: &str,
    common: &CommonConfig,
    role_check: impl FnOnce() -> Result<(), E>,
) -> anyhow::Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    check_common(common)?;
    role_check()?;
    println!("{name}: configuration ok");
    Ok(())
}

/// Keys of the TOML file that belong to [`CommonConfig`]; the rest belong to the role.
pub const COMMON_KEYS: &[&str] = &[
    "zk",
    "cluster",
    "listen",
    "admin",
    "tls_dir",
    "zk_session_timeout_ms",
    "zk_refresh_ms",
    "drain_ms",
];

/// Load the common settings and a role's own settings from an optional TOML file (defaults
/// when none). Unknown keys are refused with their name.
pub fn load_toml<T: serde::de::DeserializeOwned + Default>(
    path: Option<&Path>,
) -> Result<(CommonConfig, T), crate::RuntimeError> {
    let Some(path) = path else {
        return Ok((CommonConfig::default(), T::default()));
    };
    let err =
        |e: String| crate::RuntimeError::Config(format!("config file {}: {e}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| {
        crate::RuntimeError::Config(format!("cannot read config file {}: {e}", path.display()))
    })?;
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
    let mut common = toml::Table::new();
    for k in COMMON_KEYS {
        if let Some(v) = table.remove(*k) {
            common.insert((*k).to_string(), v);
        }
    }
    let common: CommonConfig = common
        .try_into()
        .map_err(|e: toml::de::Error| err(e.to_string()))?;
    let role: T = table
        .try_into()
        .map_err(|e: toml::de::Error| err(e.to_string()))?;
    Ok((common, role))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Deserialize)]
    #[serde(default, deny_unknown_fields)]
    struct RoleCfg {
        partition: u32,
    }

    #[test]
    fn toml_then_flags() {
        let dir = std::env::temp_dir().join(format!("pixiu-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(
            &f,
            "zk = \"127.0.0.1:2181\"\ncluster = \"a\"\npartition = 3\n",
        )
        .unwrap();
        let (mut common, c): (CommonConfig, RoleCfg) = load_toml(Some(&f)).unwrap();
        assert_eq!(c.partition, 3);
        assert_eq!(common.cluster, "a");
        let args = CommonArgs {
            cluster: Some("b".into()),
            ..Default::default()
        };
        args.apply(&mut common);
        assert_eq!(common.cluster, "b");
        assert_eq!(common.zk.as_deref(), Some("127.0.0.1:2181"));
        std::fs::write(&f, "bogus = 1\n").unwrap();
        let e = load_toml::<RoleCfg>(Some(&f)).unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        assert!(load_toml::<RoleCfg>(Some(&dir.join("missing.toml"))).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
