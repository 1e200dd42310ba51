//! Checks `api/openapi.json` against a running node: every documented operation answers with a
//! status the document lists for it, in the documented shape (every required field, recursively).

use serde_json::Value;

use super::Node;

/// Follows a `$ref` into the document's components.
fn deref<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v["$ref"].as_str().and_then(|r| r.strip_prefix("#/")) {
        Some(path) => deref(doc, path.split('/').fold(doc, |at, part| &at[part])),
        None => v,
    }
}

/// `value` has every required field of `schema`, recursively through objects and arrays.
fn conforms(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = deref(doc, schema);
    if let Some(required) = schema["required"].as_array() {
        let obj = value.as_object().ok_or(format!("{at}: not an object: {value}"))?;
        for r in required.iter().filter_map(|r| r.as_str()) {
            if !obj.contains_key(r) {
                return Err(format!("{at}: no `{r}` in {value}"));
            }
        }
        for (name, sub) in schema["properties"].as_object().into_iter().flatten() {
            if let Some(v) = obj.get(name).filter(|v| !v.is_null()) {
                conforms(doc, sub, v, &format!("{at}.{name}"))?;
            }
        }
    }
    if let (Some(items), Some(values)) = (schema.get("items"), value.as_array()) {
        for (i, v) in values.iter().enumerate() {
            conforms(doc, items, v, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

pub fn document() -> Value {
    serde_json::from_str(include_str!("../../api/openapi.json")).unwrap()
}

/// Every (METHOD, path) the document describes.
pub fn operations(doc: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys().filter(|m| *m != "parameters") {
            out.push((method.to_uppercase(), path.clone()));
        }
    }
    out
}

/// Calls every documented operation once (paths in the document's order, which sorts them),
/// with `{param}`s replaced from `subst` and the documented example body; returns how many were
/// checked. Streams (`skip`) are left to their own tests.
pub fn check(n: &Node, subst: &[(&str, &str)], skip: &[&str]) -> usize {
    let doc = document();
    let fill = |s: &str| subst.iter().fold(s.to_string(), |acc, (k, v)| acc.replace(&format!("{{{k}}}"), v));
    let mut checked = 0;
    for (path, ops) in doc["paths"].as_object().unwrap() {
        if skip.contains(&path.as_str()) {
            continue;
        }
        for (method, op) in ops.as_object().unwrap().iter().filter(|(m, _)| *m != "parameters") {
            let content = &op["requestBody"]["content"];
            let body = if let Some(example) = content["application/json"].get("example") {
                Some(fill(&example.to_string()))
            } else if content.get("text/plain").is_some() {
                Some("v".to_string())
            } else if content.get("application/octet-stream").is_some() {
                Some("doc-check image bytes".to_string())
            } else {
                None
            };
            let url = fill(path);
            let (code, reply) = n.call(&method.to_uppercase(), &url, body.as_deref()).unwrap();
            let response = deref(&doc, &op["responses"][code.to_string()]);
            assert!(!response.is_null(), "{method} {url} answered {code}, which the document does not list: {reply}");
            if let Some(schema) = response["content"]["application/json"].get("schema") {
                conforms(&doc, schema, &reply, &format!("{method} {path} {code}")).unwrap();
            }
            checked += 1;
        }
    }
    checked
}
