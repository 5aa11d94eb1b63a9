//! The fake API server at the HTTP level: status codes and shapes a real
//! kube-apiserver would give, spoken to with a minimal HTTP/1.0 client on 127.0.0.1.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use flannel_kube_fake::{node, FakeApiServer, FakeOptions};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(30);

async fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &str,
) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    let mut req = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(ct) = content_type {
        req.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await?;
    Ok(s)
}

/// One request; the server closes an HTTP/1.0 connection after the response.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &str,
) -> Result<(u16, Value)> {
    let mut s = send(addr, method, path, content_type, body).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8(buf)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no header end")?;
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    let v = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).with_context(|| format!("body {body:?}"))?
    };
    Ok((code, v))
}

/// A watch: the status code and a reader of event lines.
async fn watch(addr: SocketAddr, query: &str) -> Result<(u16, BufReader<TcpStream>)> {
    let s = send(
        addr,
        "GET",
        &format!("/api/v1/nodes?watch=true{query}"),
        None,
        "",
    )
    .await?;
    let mut r = BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).await?;
    let code: u16 = status
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    loop {
        let mut line = String::new();
        r.read_line(&mut line).await?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    Ok((code, r))
}

async fn next_event(r: &mut BufReader<TcpStream>) -> Result<Value> {
    let mut line = String::new();
    let n = tokio::time::timeout(WAIT, r.read_line(&mut line)).await??;
    if n == 0 {
        bail!("watch ended");
    }
    Ok(serde_json::from_str(&line)?)
}

fn assert_status(v: &Value, code: u16, reason: &str) {
    assert_eq!(v["kind"], "Status", "{v}");
    assert_eq!(v["apiVersion"], "v1", "{v}");
    assert_eq!(v["status"], "Failure", "{v}");
    assert_eq!(v["code"], code, "{v}");
    assert_eq!(v["reason"], reason, "{v}");
}

const SMP: &str = "application/strategic-merge-patch+json";

#[tokio::test]
async fn patches_are_checked_like_the_real_server() -> Result<()> {
    let fake = FakeApiServer::start_local().await?;
    let a = fake.addr();
    fake.create_node(node("n1", &["10.244.1.0/24"]))?;
    let path = "/api/v1/nodes/n1/status";
    let ann =
        r#"{"metadata":{"annotations":{"flannel.alpha.coreos.com/public-ip":"192.168.1.1"}}}"#;

    let (code, v) = call(a, "PATCH", path, Some("text/plain"), ann).await?;
    assert_eq!(code, 415);
    assert_status(&v, 415, "UnsupportedMediaType");
    let (code, v) = call(a, "PATCH", path, Some(SMP), "{not json").await?;
    assert_eq!(code, 400);
    assert_status(&v, 400, "BadRequest");
    let (code, v) = call(a, "PATCH", "/api/v1/nodes/nope/status", Some(SMP), ann).await?;
    assert_eq!(code, 404);
    assert_status(&v, 404, "NotFound");
    assert_eq!(v["message"], "nodes \"nope\" not found");
    assert_eq!(v["details"], json!({"name": "nope", "kind": "nodes"}));
    let (code, v) = call(
        a,
        "PATCH",
        path,
        Some(SMP),
        r#"{"metadata":{"annotations":{"bad key!":"x"}}}"#,
    )
    .await?;
    assert_eq!(code, 422);
    assert_status(&v, 422, "Invalid");
    let (code, v) = call(
        a,
        "PATCH",
        path,
        Some(SMP),
        r#"{"metadata":{"annotations":{"a":1}}}"#,
    )
    .await?;
    assert_eq!(code, 400, "annotation values are strings: {v}");

    let (code, v) = call(a, "PATCH", path, Some(SMP), ann).await?;
    assert_eq!(code, 200, "{v}");
    assert_eq!(
        v["metadata"]["annotations"]["flannel.alpha.coreos.com/public-ip"],
        "192.168.1.1"
    );
    let rv = v["metadata"]["resourceVersion"].clone();
    // The same patch again changes nothing: same resource version.
    let (_, v) = call(a, "PATCH", path, Some(SMP), ann).await?;
    assert_eq!(v["metadata"]["resourceVersion"], rv);

    // Conditions merge by type (strategic), a merge patch replaces the list.
    let cond = |t: &str, s: &str| json!({"status": {"conditions": [{"type": t, "status": s}]}});
    call(
        a,
        "PATCH",
        path,
        Some(SMP),
        &cond("Ready", "True").to_string(),
    )
    .await?;
    let (_, v) = call(
        a,
        "PATCH",
        path,
        Some(SMP),
        &cond("NetworkUnavailable", "False").to_string(),
    )
    .await?;
    assert_eq!(
        v["status"]["conditions"].as_array().map(Vec::len),
        Some(2),
        "{v}"
    );
    let (_, v) = call(
        a,
        "PATCH",
        path,
        Some(SMP),
        &cond("Ready", "False").to_string(),
    )
    .await?;
    let conds = v["status"]["conditions"].as_array().context("conditions")?;
    assert_eq!(conds.len(), 2);
    assert_eq!(conds[0], json!({"type": "Ready", "status": "False"}));
    let (_, v) = call(
        a,
        "PATCH",
        path,
        Some("application/merge-patch+json"),
        &cond("X", "True").to_string(),
    )
    .await?;
    assert_eq!(
        v["status"]["conditions"],
        json!([{"type": "X", "status": "True"}])
    );
    // The status subresource ignores spec changes.
    let (_, v) = call(
        a,
        "PATCH",
        path,
        Some(SMP),
        r#"{"spec":{"podCIDR":"10.9.9.0/24"}}"#,
    )
    .await?;
    assert_eq!(v["spec"]["podCIDR"], "10.244.1.0/24");
    // JSON patch, and a resourceVersion precondition that no longer holds.
    let (code, v) = call(
        a,
        "PATCH",
        "/api/v1/nodes/n1",
        Some("application/json-patch+json"),
        r#"[{"op":"add","path":"/metadata/labels","value":{"l":"1"}}]"#,
    )
    .await?;
    assert_eq!(
        (code, &v["metadata"]["labels"]["l"]),
        (200, &json!("1")),
        "{v}"
    );
    let (code, v) = call(
        a,
        "PATCH",
        "/api/v1/nodes/n1",
        Some("application/merge-patch+json"),
        r#"{"metadata":{"resourceVersion":"1","labels":{"l":"2"}}}"#,
    )
    .await?;
    assert_eq!(code, 409, "{v}");
    assert_status(&v, 409, "Conflict");
    Ok(())
}

#[tokio::test]
async fn forbidden_looks_like_rbac() -> Result<()> {
    let fake = FakeApiServer::start_local().await?;
    let a = fake.addr();
    fake.create_node(node("n1", &["10.244.1.0/24"]))?;
    fake.deny("list", "nodes");
    fake.deny("patch", "nodes/status");
    let (code, v) = call(a, "GET", "/api/v1/nodes", None, "").await?;
    assert_eq!(code, 403);
    assert_status(&v, 403, "Forbidden");
    assert_eq!(
        v["message"],
        "nodes is forbidden: User \"system:serviceaccount:kube-flannel:flannel\" cannot list resource \"nodes\" in API group \"\" at the cluster scope"
    );
    let (code, v) = call(a, "PATCH", "/api/v1/nodes/n1/status", Some(SMP), "{}").await?;
    assert_eq!(code, 403);
    assert!(v["message"]
        .as_str()
        .unwrap_or("")
        .starts_with("nodes \"n1\" is forbidden: User \"system:serviceaccount:kube-flannel:flannel\" cannot patch resource \"nodes/status\""));
    // Other verbs are unaffected.
    let (code, _) = call(a, "GET", "/api/v1/nodes/n1", None, "").await?;
    assert_eq!(code, 200);
    let (code, _) = call(a, "PATCH", "/api/v1/nodes/n1", Some(SMP), "{}").await?;
    assert_eq!(code, 200);
    fake.allow_all();
    let (code, _) = call(a, "GET", "/api/v1/nodes", None, "").await?;
    assert_eq!(code, 200);
    Ok(())
}

#[tokio::test]
async fn lists_paginate_consistently_and_expire() -> Result<()> {
    let fake = FakeApiServer::start_local().await?;
    let a = fake.addr();
    for i in 1..=5 {
        fake.create_node(node(&format!("n{i}"), &[&format!("10.244.{i}.0/24")]))?;
    }
    let (code, v) = call(a, "GET", "/api/v1/nodes?limit=2", None, "").await?;
    assert_eq!(code, 200);
    assert_eq!(v["kind"], "NodeList");
    let rv = v["metadata"]["resourceVersion"].clone();
    assert_eq!(v["items"].as_array().map(Vec::len), Some(2));
    assert!(
        v["items"][0].get("kind").is_none(),
        "list items carry no kind"
    );
    assert_eq!(v["metadata"]["remainingItemCount"], 3);
    // A change between pages does not show up: the pages are one snapshot.
    fake.create_node(node("n0", &["10.244.100.0/24"]))?;
    let mut names: Vec<String> = Vec::new();
    let mut page = v;
    loop {
        for i in page["items"].as_array().context("items")? {
            names.push(i["metadata"]["name"].as_str().unwrap_or("").to_string());
        }
        let Some(c) = page["metadata"]["continue"].as_str().map(String::from) else {
            break;
        };
        let (code, next) = call(
            a,
            "GET",
            &format!("/api/v1/nodes?limit=2&continue={c}"),
            None,
            "",
        )
        .await?;
        assert_eq!(code, 200);
        assert_eq!(next["metadata"]["resourceVersion"], rv);
        page = next;
    }
    assert_eq!(names, ["n1", "n2", "n3", "n4", "n5"]);

    let (_, v) = call(a, "GET", "/api/v1/nodes?limit=2", None, "").await?;
    let c = v["metadata"]["continue"]
        .as_str()
        .context("continue")?
        .to_string();
    fake.compact();
    let (code, v) = call(
        a,
        "GET",
        &format!("/api/v1/nodes?limit=2&continue={c}"),
        None,
        "",
    )
    .await?;
    assert_eq!(code, 410);
    assert_status(&v, 410, "Expired");

    let (code, v) = call(a, "GET", "/api/v1/nodes?resourceVersion=abc", None, "").await?;
    assert_eq!(code, 400, "{v}");
    let (code, v) = call(a, "GET", "/api/v1/nodes?resourceVersion=999999", None, "").await?;
    assert_eq!(code, 504, "{v}");
    let (code, _) = call(
        a,
        "GET",
        "/api/v1/nodes?fieldSelector=metadata.name%3Dn3",
        None,
        "",
    )
    .await?;
    assert_eq!(code, 200);
    Ok(())
}

#[tokio::test]
async fn watches_replay_bookmark_and_expire() -> Result<()> {
    let fake = FakeApiServer::start(
        ([127, 0, 0, 1], 0).into(),
        FakeOptions {
            bookmark_interval: Duration::from_millis(200),
            ..FakeOptions::default()
        },
    )
    .await?;
    let a = fake.addr();
    fake.create_node(node("n1", &["10.244.1.0/24"]))?;
    let rv1 = fake.resource_version();
    fake.create_node(node("n2", &["10.244.2.0/24"]))?;
    fake.delete_node("n1")?;

    // From rv1: the two later changes, in order, then bookmarks at the latest version.
    let (code, mut w) = watch(
        a,
        &format!("&resourceVersion={rv1}&allowWatchBookmarks=true"),
    )
    .await?;
    assert_eq!(code, 200);
    let e = next_event(&mut w).await?;
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("n2"))
    );
    assert_eq!(e["object"]["kind"], "Node");
    let e = next_event(&mut w).await?;
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("DELETED"), Some("n1"))
    );
    let e = next_event(&mut w).await?;
    assert_eq!(e["type"], "BOOKMARK");
    assert_eq!(
        e["object"]["metadata"]["resourceVersion"],
        fake.resource_version().to_string()
    );
    // Live changes follow.
    fake.modify_node("n2", |n| {
        n.metadata.labels = Some([("x".to_string(), "y".to_string())].into());
    })?;
    let e = loop {
        let e = next_event(&mut w).await?;
        if e["type"] != "BOOKMARK" {
            break e;
        }
    };
    assert_eq!(e["type"], "MODIFIED");

    // The server drops it as too far behind: ERROR 410, then the stream ends.
    fake.expire_watches();
    let e = loop {
        let e = next_event(&mut w).await?;
        if e["type"] != "BOOKMARK" {
            break e;
        }
    };
    assert_eq!(e["type"], "ERROR");
    assert_status(&e["object"], 410, "Expired");
    assert!(
        next_event(&mut w).await.is_err(),
        "stream ends after the error"
    );

    // Watching from a compacted version: 200 with one ERROR 410 event.
    let (code, mut w) = watch(a, &format!("&resourceVersion={rv1}")).await?;
    assert_eq!(code, 200);
    let e = next_event(&mut w).await?;
    assert_eq!(e["type"], "ERROR");
    assert_eq!(e["object"]["code"], 410);
    assert!(e["object"]["message"]
        .as_str()
        .unwrap_or("")
        .starts_with("too old resource version"));

    // No resourceVersion: the current objects as ADDED; a field selector filters.
    let (_, mut w) = watch(a, "&fieldSelector=metadata.name%3Dn2").await?;
    let e = next_event(&mut w).await?;
    assert_eq!(
        (e["type"].as_str(), e["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("n2"))
    );
    let (code, _) = watch(a, "&resourceVersion=x").await?;
    assert_eq!(code, 400);
    Ok(())
}

#[tokio::test]
async fn binary_serves_and_keeps_state() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state.json");
    let start = || -> Result<(std::process::Child, SocketAddr)> {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_flannel-kube-fake"))
            .args(["--listen", "127.0.0.1:0", "--state"])
            .arg(&state)
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let out = child.stdout.take().context("stdout")?;
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line)?;
        let addr = line
            .trim()
            .strip_prefix("http://")
            .context("url line")?
            .parse()?;
        Ok((child, addr))
    };
    let (mut child, addr) = start()?;
    let body = serde_json::to_string(&node("n1", &["10.244.1.0/24"]))?;
    let (code, v) = call(
        addr,
        "POST",
        "/api/v1/nodes",
        Some("application/json"),
        &body,
    )
    .await?;
    assert_eq!(code, 201, "{v}");
    let (code, _) = call(
        addr,
        "POST",
        "/api/v1/nodes",
        Some("application/json"),
        &body,
    )
    .await?;
    assert_eq!(code, 409);
    let (code, _) = call(
        addr,
        "POST",
        "/fake/v1/deny",
        None,
        r#"{"verb":"get","resource":"nodes"}"#,
    )
    .await?;
    assert_eq!(code, 200);
    let (code, _) = call(addr, "GET", "/api/v1/nodes/n1", None, "").await?;
    assert_eq!(code, 403);
    child.kill()?;
    child.wait()?;

    let (mut child, addr) = start()?;
    let (code, v) = call(addr, "GET", "/api/v1/nodes/n1", None, "").await?;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["spec"]["podCIDR"], "10.244.1.0/24");
    let (code, v) = call(addr, "GET", "/fake/v1/requests", None, "").await?;
    assert_eq!(code, 200);
    assert_eq!(v.as_array().map(Vec::len), Some(1), "{v}");
    child.kill()?;
    child.wait()?;
    Ok(())
}
