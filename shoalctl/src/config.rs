//! Where shoalctl finds its cluster: named contexts in `~/.config/shoal/config` (YAML, like a
//! kubeconfig), each an endpoint, a token and a default tenant; flags and environment variables
//! win over the file.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Context {
    pub name: String,
    pub endpoint: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The cluster CA (PEM) the endpoint's certificate is verified with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ConfigFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    #[serde(default)]
    pub contexts: Vec<Context>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not a shoalctl config: {source}")]
    Parse { path: String, source: yaml_serde::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("no context named {0:?} (shoalctl config view lists them)")]
    NoContext(String),
}

/// `$SHOAL_CONFIG`, else `$XDG_CONFIG_HOME/shoal/config`, else `~/.config/shoal/config`.
pub fn path() -> PathBuf {
    if let Some(p) = std::env::var_os("SHOAL_CONFIG") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("shoal").join("config")
}

impl ConfigFile {
    /// The file, or an empty config when there is none.
    pub fn load() -> Result<ConfigFile, ConfigError> {
        let p = path();
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(ConfigFile::default()),
            Err(source) => return Err(ConfigError::Read { path: p.display().to_string(), source }),
        };
        yaml_serde::from_str(&text).map_err(|source| ConfigError::Parse { path: p.display().to_string(), source })
    }

    pub fn save(&self) -> Result<(), ConfigError> {
        let p = path();
        let err = |source| ConfigError::Write { path: p.display().to_string(), source };
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let text = yaml_serde::to_string(self).map_err(|e| err(std::io::Error::other(e)))?;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&p).map_err(err)?;
        std::io::Write::write_all(&mut f, text.as_bytes()).map_err(err)
    }

    /// The named context, or the current one (None when the file names none).
    pub fn context(&self, name: Option<&str>) -> Result<Option<&Context>, ConfigError> {
        match name.or(self.current_context.as_deref()) {
            Some(n) => {
                self.contexts.iter().find(|c| c.name == n).map(Some).ok_or_else(|| ConfigError::NoContext(n.into()))
            }
            None => Ok(None),
        }
    }

    /// Adds or replaces a context, and makes it current when there was none.
    pub fn set(&mut self, ctx: Context) {
        if self.current_context.is_none() {
            self.current_context = Some(ctx.name.clone());
        }
        match self.contexts.iter_mut().find(|c| c.name == ctx.name) {
            Some(c) => *c = ctx,
            None => self.contexts.push(ctx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_are_named_and_the_first_becomes_current() {
        let mut f = ConfigFile::default();
        f.set(Context { name: "a".into(), endpoint: "http://1".into(), token: None, tenant: None, ca: None });
        f.set(Context {
            name: "b".into(),
            endpoint: "http://2".into(),
            token: Some("t".into()),
            tenant: None,
            ca: None,
        });
        assert_eq!(f.context(None).unwrap().unwrap().endpoint, "http://1");
        assert_eq!(f.context(Some("b")).unwrap().unwrap().token.as_deref(), Some("t"));
        assert!(matches!(f.context(Some("c")), Err(ConfigError::NoContext(_))));
        let text = yaml_serde::to_string(&f).unwrap();
        assert!(text.contains("current-context: a"), "{text}");
        assert_eq!(yaml_serde::from_str::<ConfigFile>(&text).unwrap(), f);
    }
}
