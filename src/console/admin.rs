//! The node's local admin endpoint: a Unix socket in the data directory
//! (mode 0600) that the `crossbar` command uses while a node runs (the
//! embedded store is locked by the running node). One JSON request per line,
//! one JSON answer per line:
//!
//! ```text
//! {"op":"cdr.list","tenant":"acme","limit":100}
//! {"op":"events.list","tenant":"acme","after":0,"limit":100}
//! {"op":"recording.get","tenant":"acme","id":"<cdr id>"}      → WAV as base64
//! {"op":"tenant.set_plan","tenant":"acme","plan":"pro"}
//! ← {"ok":true,"result":...} | {"ok":false,"error":{"code":"unknown_tenant","message":"..."}}
//! ```
//! Every operation is scoped to the tenant it names: there is no request that
//! reads across tenants.

use crate::actors::node::Node;
use crate::actors::tenant::{TenantMsg, TenantUpdate};
use crate::config::{LimitOverrides, Plan};
use crate::store::{RecordKind, StoreError, TenantId, Vault};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

#[derive(Debug, Deserialize, Serialize)]
#[serde(tag = "op")]
pub enum Request {
    #[serde(rename = "cdr.list")]
    CdrList { tenant: String, #[serde(default)] after: Option<String>, #[serde(default = "default_limit")] limit: usize },
    #[serde(rename = "events.list")]
    EventsList { tenant: String, #[serde(default)] after: Option<u64>, #[serde(default = "default_limit")] limit: usize },
    #[serde(rename = "recording.list")]
    RecordingList { tenant: String, #[serde(default = "default_limit")] limit: usize },
    #[serde(rename = "recording.get")]
    RecordingGet { tenant: String, id: String },
    #[serde(rename = "tenant.set_plan")]
    SetPlan { tenant: String, plan: String, #[serde(default)] limits: Option<LimitOverrides> },
    /// New data key for the tenant's new writes; older data stays readable.
    #[serde(rename = "keys.rotate")]
    KeysRotate { tenant: String },
    /// The node's counters: calls in progress, media ports in use, registrations.
    #[serde(rename = "node.status")]
    NodeStatus,
    /// Destroys the tenant's keys (crypto-shredding) and deletes its records. Offline only.
    #[serde(rename = "tenant.delete")]
    TenantDelete { tenant: String },
}

fn default_limit() -> usize {
    100
}

/// A refused request: a stable code and a sentence.
#[derive(Debug, Serialize, Deserialize, Clone, PartialEq)]
pub struct AdminError {
    pub code: String,
    pub message: String,
}

impl AdminError {
    fn new(code: &str, message: impl Into<String>) -> Self {
        AdminError { code: code.into(), message: message.into() }
    }
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UnknownTenant(t) => AdminError::new("unknown_tenant", format!("no tenant {t}")),
            other => AdminError::new("store_error", other.to_string()),
        }
    }
}

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}

/// Runs a request against a vault (and a running node for live changes).
pub async fn execute(vault: &Vault, node: Option<&Arc<Node>>, req: Request) -> Result<Value, AdminError> {
    let tenant_id = |t: &str| TenantId::new(t.to_string()).map_err(|e| AdminError::new("invalid_tenant", e.to_string()));
    match req {
        Request::CdrList { tenant, after, limit } => {
            let store = vault.open_tenant(&tenant_id(&tenant)?).await?;
            let cdrs = crate::cdr::list(&store, after.as_deref(), limit.min(10_000)).await?;
            Ok(serde_json::to_value(cdrs).expect("CDRs serialize"))
        }
        Request::EventsList { tenant, after, limit } => {
            let store = vault.open_tenant(&tenant_id(&tenant)?).await?;
            let events = store.read_events_json::<Value>(after, limit.min(1000)).await?;
            Ok(json!(events.into_iter().map(|(seq, e)| json!({"seq": seq, "event": e})).collect::<Vec<_>>()))
        }
        Request::RecordingList { tenant, limit } => {
            // The CDRs name their recordings; listing those avoids loading the audio.
            let store = vault.open_tenant(&tenant_id(&tenant)?).await?;
            let cdrs = crate::cdr::list(&store, None, 100_000).await?;
            let recs: Vec<Value> = cdrs
                .into_iter()
                .filter(|c| c.recording.is_some())
                .take(limit)
                .map(|c| json!({"id": c.recording, "start": c.start, "from": c.from, "to": c.to, "duration_s": c.duration_s}))
                .collect();
            Ok(json!(recs))
        }
        Request::RecordingGet { tenant, id } => {
            let store = vault.open_tenant(&tenant_id(&tenant)?).await?;
            match store.get(RecordKind::Recording, &id).await? {
                Some(wav) => Ok(json!({"id": id, "wav_base64": base64::engine::general_purpose::STANDARD.encode(wav)})),
                None => Err(AdminError::new("not_found", format!("tenant {tenant} has no recording {id}"))),
            }
        }
        Request::NodeStatus => {
            let Some(node) = node else { return Err(AdminError::new("node_not_running", "no node runs on this data directory")) };
            Ok(json!({
                "calls_in_progress": node.calls_in_progress(),
                "call_routes": node.calls.len(),
                "media_ports_in_use": node.media.ports_in_use(),
                "tenants": node.routing.read().by_id.len(),
            }))
        }
        Request::KeysRotate { tenant } => {
            let id = vault.rotate_tenant_key(&tenant_id(&tenant)?).await?;
            Ok(json!({"tenant": tenant, "current_key_id": id.to_string()}))
        }
        Request::TenantDelete { tenant } => {
            if node.is_some() {
                return Err(AdminError::new("node_running", "stop the node before deleting a tenant (its actor still holds the tenant)"));
            }
            let d = vault.delete_tenant(&tenant_id(&tenant)?).await?;
            Ok(json!({"tenant": tenant, "keys_destroyed": d.keys_destroyed, "records_deleted": d.records_deleted}))
        }
        Request::SetPlan { tenant, plan, limits } => {
            let plan = Plan::parse(&plan).ok_or_else(|| AdminError::new("invalid_plan", format!("unknown plan {plan:?}: use starter, pro or enterprise")))?;
            let update = TenantUpdate::Plan { plan, limits };
            if let Some(node) = node {
                let route = node.routing.read().by_id.get(&tenant).cloned();
                let Some(route) = route else { return Err(AdminError::new("unknown_tenant", format!("no tenant {tenant} on this node"))) };
                let result = ractor::call_t!(route.actor, TenantMsg::Update, 5000, update)
                    .map_err(|e| AdminError::new("tenant_unavailable", format!("tenant {tenant} did not answer: {e}")))?;
                let limits = result.map_err(|m| AdminError::new("plan_refused", m))?;
                Ok(serde_json::to_value(limits).expect("limits serialize"))
            } else {
                let store = vault.open_tenant(&tenant_id(&tenant)?).await?;
                let Some(mut cfg) = store.get_json::<crate::config::TenantConfig>(RecordKind::Config, "tenant").await? else {
                    return Err(AdminError::new("unknown_tenant", format!("tenant {tenant} has no stored configuration")));
                };
                let TenantUpdate::Plan { plan, limits } = update;
                cfg.plan = plan;
                if let Some(l) = limits {
                    cfg.limits = l;
                }
                cfg.check_plan().map_err(|(f, p, fix)| AdminError::new("plan_refused", format!("{f}: {p}. Fix: {fix}")))?;
                store.put_json(RecordKind::Config, "tenant", &cfg).await?;
                Ok(serde_json::to_value(cfg.limits()).expect("limits serialize"))
            }
        }
    }
}

/// Serves the admin socket until the process ends.
pub async fn serve(node: Arc<Node>, path: PathBuf) -> std::io::Result<()> {
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let node = node.clone();
            tokio::spawn(async move {
                let (rd, mut wr) = stream.into_split();
                let mut lines = BufReader::new(rd).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let answer = match serde_json::from_str::<Request>(&line) {
                        Ok(req) => match execute(&node.vault, Some(&node), req).await {
                            Ok(v) => json!({"ok": true, "result": v}),
                            Err(e) => json!({"ok": false, "error": e}),
                        },
                        Err(e) => json!({"ok": false, "error": AdminError::new("bad_request", format!("cannot read the request: {e}"))}),
                    };
                    let mut out = answer.to_string();
                    out.push('\n');
                    if wr.write_all(out.as_bytes()).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok(())
}

/// Client side: sends one request to a running node. `Ok(None)` when no node
/// listens there (the caller may then open the store itself).
pub async fn request(path: &Path, req: &Request) -> Result<Option<Result<Value, AdminError>>, std::io::Error> {
    let stream = match tokio::net::UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) => return Ok(None),
        Err(e) => return Err(e),
    };
    let (rd, mut wr) = stream.into_split();
    let mut line = serde_json::to_string(req).expect("requests serialize");
    line.push('\n');
    wr.write_all(line.as_bytes()).await?;
    let mut lines = BufReader::new(rd).lines();
    let Some(answer) = lines.next_line().await? else { return Err(std::io::Error::other("the node closed the admin connection")) };
    let v: Value = serde_json::from_str(&answer).map_err(std::io::Error::other)?;
    if v["ok"].as_bool() == Some(true) {
        Ok(Some(Ok(v["result"].clone())))
    } else {
        let e: AdminError = serde_json::from_value(v["error"].clone()).unwrap_or_else(|_| AdminError::new("bad_answer", answer));
        Ok(Some(Err(e)))
    }
}
