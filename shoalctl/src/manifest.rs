//! Files `shoalctl apply -f` reads: YAML or JSON, one or several documents (`---`, a JSON array,
//! or a `kind: List` with `items`). Each document is a tenant or a deployment, written either
//! flat (the API body with `kind`, `name` and `tenant` beside it) or Kubernetes-style
//! (`kind`, `metadata: {name, tenant | namespace}`, `spec: <the API body>`).
//!
//! ```yaml
//! kind: Deployment
//! tenant: acme
//! name: web
//! replicas: 3
//! template:
//!   kernel: ./vmlinux        # a file: pushed first, then named by its digest
//!   cmdline: console=ttyS0
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize as _;
use serde_json::{Map, Value};

/// One object of a file, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Tenant { name: String, body: Value },
    Deployment { tenant: Option<String>, name: String, body: Value },
}

impl Object {
    pub fn describe(&self, default_tenant: &str) -> String {
        match self {
            Object::Tenant { name, .. } => format!("tenant/{name}"),
            Object::Deployment { tenant, name, .. } => {
                format!("deployment/{name} (tenant {})", tenant.as_deref().unwrap_or(default_tenant))
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    #[error("{0}: not YAML or JSON: {1}")]
    Parse(String, String),
    #[error("{0}: document {1}: {2}")]
    Bad(String, usize, String),
}

/// Reads a file (`-`: standard input) into its objects; image paths in templates are resolved
/// against the file's directory.
pub fn read(file: &str) -> Result<(Vec<Object>, PathBuf), ManifestError> {
    let (text, base) = if file == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .map_err(|e| ManifestError::Read(file.into(), e))?;
        (s, std::env::current_dir().unwrap_or_default())
    } else {
        let text = std::fs::read_to_string(file).map_err(|e| ManifestError::Read(file.into(), e))?;
        let base = Path::new(file).parent().map(Path::to_path_buf).unwrap_or_default();
        (text, base)
    };
    Ok((parse(file, &text)?, base))
}

pub fn parse(file: &str, text: &str) -> Result<Vec<Object>, ManifestError> {
    let mut docs = Vec::new();
    for doc in yaml_serde::Deserializer::from_str(text) {
        let v = Value::deserialize(doc).map_err(|e| ManifestError::Parse(file.into(), e.to_string()))?;
        match v {
            Value::Null => {}
            Value::Array(items) => docs.extend(items),
            Value::Object(ref m)
                if m.get("kind").and_then(Value::as_str).is_some_and(|k| k.eq_ignore_ascii_case("list")) =>
            {
                docs.extend(m.get("items").and_then(Value::as_array).cloned().unwrap_or_default())
            }
            other => docs.push(other),
        }
    }
    docs.into_iter()
        .enumerate()
        .map(|(i, d)| object(d).map_err(|e| ManifestError::Bad(file.into(), i + 1, e)))
        .collect()
}

fn object(doc: Value) -> Result<Object, String> {
    let Value::Object(mut m) = doc else { return Err("not an object".into()) };
    let kind =
        m.remove("kind").and_then(|k| k.as_str().map(str::to_lowercase)).ok_or("no `kind` (Tenant or Deployment)")?;
    let meta = m.remove("metadata").and_then(|v| v.as_object().cloned()).unwrap_or_default();
    let text = |m: &mut Map<String, Value>, meta: &Map<String, Value>, keys: &[&str]| -> Option<String> {
        keys.iter()
            .find_map(|k| m.remove(*k).or_else(|| meta.get(*k).cloned()))
            .and_then(|v| v.as_str().map(str::to_string))
    };
    let name = text(&mut m, &meta, &["name"]).ok_or("no `name`")?;
    let tenant = text(&mut m, &meta, &["tenant", "namespace"]);
    let body = match m.remove("spec") {
        Some(spec) => spec,
        None => Value::Object(m),
    };
    match kind.as_str() {
        "tenant" | "namespace" => Ok(Object::Tenant { name, body }),
        "deployment" => Ok(Object::Deployment { tenant, name, body }),
        other => Err(format!("unknown kind {other:?} (Tenant or Deployment)")),
    }
}

/// The template fields that name images.
pub const IMAGE_FIELDS: [&str; 3] = ["kernel", "initrd", "rootfs"];

/// Files a deployment's template names instead of digests (to push first), by field.
pub fn image_files(body: &Value, base: &Path) -> Vec<(&'static str, PathBuf)> {
    let mut out = Vec::new();
    for f in IMAGE_FIELDS {
        if let Some(s) = body["template"][f].as_str() {
            if !s.starts_with("sha256:") {
                out.push((f, base.join(s)));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_kubernetes_style_and_json_documents_read_alike() {
        let yaml = "kind: Tenant\nname: acme\nquota: {vcpus: 4}\n---\nkind: Deployment\ntenant: acme\nname: web\nreplicas: 2\ntemplate:\n  kernel: ./k.elf\n  cmdline: x\n";
        let objs = parse("f", yaml).unwrap();
        assert_eq!(objs[0], Object::Tenant { name: "acme".into(), body: serde_json::json!({"quota": {"vcpus": 4}}) });
        let Object::Deployment { tenant, name, body } = &objs[1] else { panic!() };
        assert_eq!((tenant.as_deref(), name.as_str(), body["replicas"].as_u64()), (Some("acme"), "web", Some(2)));
        assert_eq!(image_files(body, Path::new("/d")), vec![("kernel", PathBuf::from("/d/./k.elf"))]);

        let k8s = "kind: Deployment\nmetadata: {name: web, namespace: acme}\nspec: {replicas: 1, template: {kernel: 'sha256:ab'}}\n";
        let Object::Deployment { tenant, body, .. } = &parse("f", k8s).unwrap()[0] else { panic!() };
        assert_eq!(tenant.as_deref(), Some("acme"));
        assert!(image_files(body, Path::new(".")).is_empty());

        let json = r#"[{"kind": "tenant", "name": "a"}, {"kind": "Tenant", "name": "b"}]"#;
        assert_eq!(parse("f", json).unwrap().len(), 2);
    }

    #[test]
    fn bad_documents_say_which_and_why() {
        assert!(parse("f", "kind: Pod\nname: x\n").unwrap_err().to_string().contains("document 1: unknown kind"));
        assert!(parse("f", "name: x\n").unwrap_err().to_string().contains("no `kind`"));
        assert!(parse("f", "kind: Tenant\n").unwrap_err().to_string().contains("no `name`"));
        assert!(parse("f", "kind: [\n").is_err());
    }
}
