//! The node: shared handles (transports, media, routing tables) and the root
//! of the supervision tree.
//!
//! ```text
//! NodeSupervisor
//! └─ TenantSupervisor
//!    └─ Tenant(acme)        registrations, routing, admission
//!       └─ Call(id)         one B2BUA call and its media relay
//! ```
//! SIP arrives on transport tasks, which call [`Node::on_message`]
//! (`dispatch.rs`): in-dialog traffic goes straight to its Call, new
//! requests to their Tenant.

use super::call::CallMsg;
use super::tenant::{Tenant, TenantArgs, TenantMsg};
use crate::config::{Config, TenantConfig};
use crate::crypto::{MasterKey, MasterKeySource};
use crate::store::writer::RecordWriter;
use crate::store::{EmbeddedStore, RecordKind, RedisStore, RedisStoreConfig, ScopedStore, Store, TenantId, Vault};
use crate::media::{MediaConfig, MediaEngine};
use crate::sip::auth::NonceSecret;
use crate::sip::msg::{Peer, Proto};
use crate::sip::transaction::TimerConfig;
use crate::sip::transport::{TlsSettings, Transports};
use dashmap::DashMap;
use parking_lot::RwLock;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Node-wide state shared by transports, tenants and calls.
pub struct Node {
    pub config: Arc<Config>,
    pub transports: Arc<Transports>,
    pub media: MediaEngine,
    /// Call-ID (of either leg) → its Call actor: the in-dialog fast path.
    pub calls: DashMap<String, ActorRef<CallMsg>>,
    /// WebSocket connection → the tenants it sent REGISTERs to: when it closes,
    /// only those tenants are told (another tenant never hears of it).
    pub ws_tenants: DashMap<SocketAddr, Vec<String>>,
    pub routing: RwLock<Routing>,
    pub carrier_sources: HashSet<IpAddr>,
    pub trunk_outbound: Option<SocketAddr>,
    pub advertised_ip: IpAddr,
    /// `advertised_ip` as text, formatted once: it goes into messages of every call.
    pub advertised: String,
    /// `advertised_ip` as the host of a Via sent-by (an IPv6 address in brackets).
    via_host: String,
    pub nonces: NonceSecret,
    pub timers: TimerConfig,
    /// Calls in progress on this node (admission: `node.max_calls`).
    pub active_calls: AtomicUsize,
    /// New calls refused because the node was overloaded (`sip.overload_wait_ms`).
    pub overload_refused: AtomicUsize,
    pub vault: Vault,
    /// Group-commits CDRs and events.
    pub writer: RecordWriter,
}

/// Most requests a tenant may have waiting in its mailbox; beyond, new requests
/// get 503 at the edge (ractor mailboxes are unbounded, so this bounds them).
pub const TENANT_QUEUE_LIMIT: usize = 1000;

/// A tenant as the edge sees it: its actor and how much is waiting for it.
#[derive(Clone)]
pub struct TenantRoute {
    pub id: Arc<str>,
    pub actor: ActorRef<TenantMsg>,
    pub pending: Arc<AtomicUsize>,
}

/// Edge identification of tenants: by SIP domain and by DID.
#[derive(Default)]
pub struct Routing {
    pub by_id: HashMap<String, TenantRoute>,
    pub by_domain: HashMap<String, TenantRoute>,
    pub by_did: HashMap<String, TenantRoute>,
}

impl Node {
    pub fn sent_by(&self, proto: Proto) -> String {
        format!("{}:{}", self.via_host, self.transports.port(proto))
    }

    pub fn send(&self, peer: Peer, bytes: Vec<u8>) {
        self.transports.send(peer, bytes);
    }

    pub fn calls_in_progress(&self) -> usize {
        self.active_calls.load(Ordering::Relaxed)
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Opens the store and the master key; logs clearly where the key is.
pub async fn open_vault(config: &Config) -> Result<Vault, BoxError> {
    std::fs::create_dir_all(&config.node.data_dir)
        .map_err(|e| format!("cannot create data_dir {}: {e} (set [node] data_dir in {})", config.node.data_dir.display(), config.file.display()))?;
    let (master, source) = MasterKey::resolve(&config.store.master_key_file)?;
    match source {
        MasterKeySource::Env => tracing::info!("master key: from CROSSBAR_MASTER_KEY"),
        MasterKeySource::File(p) => tracing::info!("master key: {}", p.display()),
        MasterKeySource::Generated(p) => tracing::warn!(
            "generated a new master key at {}: BACK IT UP (losing it loses every tenant's data; \
             set CROSSBAR_MASTER_KEY to keep it out of the data directory)",
            p.display()
        ),
    }
    let store: Arc<dyn Store> = match config.store.backend.as_str() {
        "redis" => {
            let url = config.store.redis_url.clone().unwrap_or_default();
            Arc::new(RedisStore::connect(RedisStoreConfig::new(url)).await?)
        }
        _ => Arc::new(EmbeddedStore::open_with_cache(&config.node.data_dir, config.store.cache_mb).await?),
    };
    Ok(Vault::new(store, master))
}

/// A tenant's store scope and its configuration: the stored one, or (first
/// start) the bootstrap file's, which is then stored.
pub async fn open_tenant(vault: &Vault, file_cfg: &TenantConfig) -> Result<(ScopedStore, TenantConfig), BoxError> {
    let tid = TenantId::new(file_cfg.id.clone())?;
    let scoped = vault.open_or_create_tenant(&tid).await?;
    let cfg = match scoped.get_json::<TenantConfig>(RecordKind::Config, "tenant").await? {
        Some(mut stored) => {
            stored.file = file_cfg.file.clone();
            tracing::info!(tenant = %stored.id, "configuration from the store ({} is only read on first start)", file_cfg.file.display());
            stored
        }
        None => {
            scoped.put_json(RecordKind::Config, "tenant", file_cfg).await?;
            tracing::info!(tenant = %file_cfg.id, "bootstrapped from {}", file_cfg.file.display());
            file_cfg.clone()
        }
    };
    Ok((scoped, cfg))
}

/// Binds the listeners, starts the supervision tree and the transports.
/// Returns once everything is up.
pub async fn start(config: Config) -> Result<(Arc<Node>, ActorRef<NodeMsg>), BoxError> {
    let started = std::time::SystemTime::now();
    let vault = open_vault(&config).await?;
    let mut tenants = Vec::new();
    for t in &config.tenants {
        let (scoped, cfg) = open_tenant(&vault, t).await?;
        let n = crate::cdr::close_interrupted(&scoped, started).await?;
        if n > 0 {
            tracing::warn!(tenant = %cfg.id, "closed {n} CDRs of calls interrupted by the last stop");
        }
        tenants.push((scoped, cfg));
    }
    let writer = RecordWriter::start(vault.store().clone());
    let tls = match (config.sip.tls, &config.sip.tls_cert, &config.sip.tls_key) {
        (Some(addr), Some(cert), Some(key)) => Some(TlsSettings { addr, cert: cert.clone(), key: key.clone() }),
        _ => None,
    };
    let transports = Transports::bind(&config.sip.udp, &config.sip.tcp, tls.as_ref()).await?;
    let media = MediaEngine::with_io(MediaConfig {
        bind_ip: config.media.bind_ip,
        public_ip: config.media.public_ip,
        port_min: config.media.rtp_port_min,
        port_max: config.media.rtp_port_max,
    }, config.media.threads, config.media.io)?;
    let (t1, t2, t4) = config.timers();
    let trunk = config.trunks.first();
    let advertised_ip = config.advertised_ip().expect("validated: config has an advertised address");
    let node = Arc::new(Node {
        advertised_ip,
        advertised: advertised_ip.to_string(),
        via_host: match advertised_ip {
            IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        },
        carrier_sources: config.trunks.iter().flat_map(|t| t.inbound_sources.iter().copied()).collect(),
        trunk_outbound: trunk.and_then(|t| t.outbound),
        config: Arc::new(config),
        transports: transports.clone(),
        media,
        calls: DashMap::new(),
        ws_tenants: DashMap::new(),
        routing: RwLock::new(Routing::default()),
        nonces: NonceSecret::generate(),
        timers: TimerConfig { t1, t2, t4 },
        active_calls: AtomicUsize::new(0),
        overload_refused: AtomicUsize::new(0),
        vault,
        writer,
    });
    let (sup, _) = Actor::spawn(Some("node".into()), NodeSupervisor, (node.clone(), tenants)).await?;
    crate::console::admin::serve(node.clone(), crate::console::admin::socket_path(&node.config.node.data_dir))
        .await
        .map_err(|e| format!("cannot open the admin socket in {}: {e}", node.config.node.data_dir.display()))?;
    transports.start(node.clone());
    crate::console::http::start(node.clone()).await?;
    Ok((node, sup))
}

pub enum NodeMsg {}

/// Root supervisor: owns the TenantSupervisor; if that ever fails it is restarted.
pub struct NodeSupervisor;

pub struct NodeSupState {
    node: Arc<Node>,
    tenants: Vec<(ScopedStore, TenantConfig)>,
}

impl Actor for NodeSupervisor {
    type Msg = NodeMsg;
    type State = NodeSupState;
    type Arguments = (Arc<Node>, Vec<(ScopedStore, TenantConfig)>);

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, (node, tenants): Self::Arguments) -> Result<Self::State, ActorProcessingErr> {
        Actor::spawn_linked(Some("tenants".into()), TenantSupervisor, (node.clone(), tenants.clone()), myself.get_cell()).await?;
        Ok(NodeSupState { node, tenants })
    }

    async fn handle_supervisor_evt(&self, myself: ActorRef<Self::Msg>, evt: SupervisionEvent, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                tracing::error!(actor = ?cell.get_id(), "tenant supervisor failed: {err}; restarting it");
                let args = (state.node.clone(), state.tenants.clone());
                Actor::spawn_linked(Some("tenants".into()), TenantSupervisor, args, myself.get_cell()).await?;
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                tracing::info!(actor = ?cell.get_id(), ?reason, "tenant supervisor stopped");
            }
            _ => {}
        }
        Ok(())
    }
}

/// Supervises one Tenant actor per tenant; a failed tenant is restarted with
/// the same configuration and registrations, and no other tenant notices.
pub struct TenantSupervisor;

pub struct TenantSupState {
    node: Arc<Node>,
    /// Actor id → the tenant's args, to restart it after a failure.
    children: HashMap<ractor::ActorId, TenantArgs>,
}

impl Actor for TenantSupervisor {
    type Msg = NodeMsg;
    type State = TenantSupState;
    type Arguments = (Arc<Node>, Vec<(ScopedStore, TenantConfig)>);

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, (node, tenants): Self::Arguments) -> Result<Self::State, ActorProcessingErr> {
        let mut state = TenantSupState { node: node.clone(), children: HashMap::new() };
        for (store, cfg) in tenants {
            let used = match store.get(RecordKind::Config, "recording-usage").await {
                Ok(Some(v)) => String::from_utf8_lossy(&v).parse().unwrap_or(0),
                _ => 0,
            };
            let args = TenantArgs::new(cfg, store, node.clone(), used);
            spawn_tenant(&myself, &mut state, args).await?;
        }
        Ok(state)
    }

    async fn handle_supervisor_evt(&self, myself: ActorRef<Self::Msg>, evt: SupervisionEvent, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                if let Some(args) = state.children.remove(&cell.get_id()) {
                    tracing::error!(tenant = %args.config.lock().id, "tenant actor failed: {err}; restarting it");
                    spawn_tenant(&myself, state, args).await?;
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                if let Some(args) = state.children.remove(&cell.get_id()) {
                    let cfg = args.config.lock().clone();
                    tracing::info!(tenant = %cfg.id, ?reason, "tenant actor stopped");
                    unroute(&state.node, &cfg);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

async fn spawn_tenant(sup: &ActorRef<NodeMsg>, state: &mut TenantSupState, args: TenantArgs) -> Result<(), ActorProcessingErr> {
    let cfg = args.config.lock().clone();
    let (tenant, _) = Actor::spawn_linked(None, Tenant, args.clone(), sup.get_cell()).await?;
    args.pending.store(0, Ordering::Relaxed);
    let route = TenantRoute { id: cfg.id.as_str().into(), actor: tenant.clone(), pending: args.pending.clone() };
    state.children.insert(tenant.get_id(), args);
    let mut routing = state.node.routing.write();
    routing.by_id.insert(cfg.id.clone(), route.clone());
    routing.by_domain.insert(cfg.domain.to_ascii_lowercase(), route.clone());
    for d in &cfg.dids {
        routing.by_did.insert(d.number.clone(), route.clone());
    }
    Ok(())
}

fn unroute(node: &Node, cfg: &TenantConfig) {
    let mut routing = node.routing.write();
    routing.by_id.remove(&cfg.id);
    routing.by_domain.remove(&cfg.domain.to_ascii_lowercase());
    for d in &cfg.dids {
        routing.by_did.remove(&d.number);
    }
}
