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
    pub routing: RwLock<Routing>,
    pub carrier_sources: HashSet<IpAddr>,
    pub trunk_outbound: Option<SocketAddr>,
    pub advertised_ip: IpAddr,
    pub nonces: NonceSecret,
    pub timers: TimerConfig,
    /// Calls in progress on this node (admission: `node.max_calls`).
    pub active_calls: AtomicUsize,
}

/// Edge identification of tenants: by SIP domain and by DID.
#[derive(Default)]
pub struct Routing {
    pub by_domain: HashMap<String, ActorRef<TenantMsg>>,
    pub by_did: HashMap<String, ActorRef<TenantMsg>>,
}

impl Node {
    pub fn sent_by(&self, proto: Proto) -> String {
        let ip = match self.advertised_ip {
            IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        };
        format!("{ip}:{}", self.transports.port(proto))
    }

    pub fn send(&self, peer: Peer, bytes: Vec<u8>) {
        self.transports.send(peer, bytes);
    }

    pub fn calls_in_progress(&self) -> usize {
        self.active_calls.load(Ordering::Relaxed)
    }
}

/// Binds the listeners, starts the supervision tree and the transports.
/// Returns once everything is up.
pub async fn start(config: Config) -> Result<(Arc<Node>, ActorRef<NodeMsg>), Box<dyn std::error::Error + Send + Sync>> {
    let tls = match (config.sip.tls, &config.sip.tls_cert, &config.sip.tls_key) {
        (Some(addr), Some(cert), Some(key)) => Some(TlsSettings { addr, cert: cert.clone(), key: key.clone() }),
        _ => None,
    };
    let transports = Transports::bind(&config.sip.udp, &config.sip.tcp, tls.as_ref()).await?;
    let media = MediaEngine::new(MediaConfig {
        bind_ip: config.media.bind_ip,
        public_ip: config.media.public_ip,
        port_min: config.media.rtp_port_min,
        port_max: config.media.rtp_port_max,
    })?;
    let (t1, t2, t4) = config.timers();
    let trunk = config.trunks.first();
    let node = Arc::new(Node {
        advertised_ip: config.advertised_ip().expect("validated: config has an advertised address"),
        carrier_sources: config.trunks.iter().flat_map(|t| t.inbound_sources.iter().copied()).collect(),
        trunk_outbound: trunk.and_then(|t| t.outbound),
        config: Arc::new(config),
        transports: transports.clone(),
        media,
        calls: DashMap::new(),
        routing: RwLock::new(Routing::default()),
        nonces: NonceSecret::generate(),
        timers: TimerConfig { t1, t2, t4 },
        active_calls: AtomicUsize::new(0),
    });
    let (sup, _) = Actor::spawn(Some("node".into()), NodeSupervisor, node.clone()).await?;
    transports.start(node.clone());
    crate::console::http::start(node.clone()).await?;
    Ok((node, sup))
}

pub enum NodeMsg {}

/// Root supervisor: owns the TenantSupervisor; if that ever fails it is restarted.
pub struct NodeSupervisor;

impl Actor for NodeSupervisor {
    type Msg = NodeMsg;
    type State = Arc<Node>;
    type Arguments = Arc<Node>;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, node: Arc<Node>) -> Result<Self::State, ActorProcessingErr> {
        Actor::spawn_linked(Some("tenants".into()), TenantSupervisor, node.clone(), myself.get_cell()).await?;
        Ok(node)
    }

    async fn handle_supervisor_evt(&self, myself: ActorRef<Self::Msg>, evt: SupervisionEvent, node: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                tracing::error!(actor = ?cell.get_id(), "tenant supervisor failed: {err}; restarting it");
                Actor::spawn_linked(Some("tenants".into()), TenantSupervisor, node.clone(), myself.get_cell()).await?;
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
    type Arguments = Arc<Node>;

    async fn pre_start(&self, myself: ActorRef<Self::Msg>, node: Arc<Node>) -> Result<Self::State, ActorProcessingErr> {
        let mut state = TenantSupState { node: node.clone(), children: HashMap::new() };
        for t in node.config.tenants.clone() {
            let args = TenantArgs::new(t, node.clone());
            spawn_tenant(&myself, &mut state, args).await?;
        }
        Ok(state)
    }

    async fn handle_supervisor_evt(&self, myself: ActorRef<Self::Msg>, evt: SupervisionEvent, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                if let Some(args) = state.children.remove(&cell.get_id()) {
                    tracing::error!(tenant = %args.config.id, "tenant actor failed: {err}; restarting it");
                    spawn_tenant(&myself, state, args).await?;
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                if let Some(args) = state.children.remove(&cell.get_id()) {
                    tracing::info!(tenant = %args.config.id, ?reason, "tenant actor stopped");
                    unroute(&state.node, &args.config);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

async fn spawn_tenant(sup: &ActorRef<NodeMsg>, state: &mut TenantSupState, args: TenantArgs) -> Result<(), ActorProcessingErr> {
    let cfg = args.config.clone();
    let (tenant, _) = Actor::spawn_linked(None, Tenant, args.clone(), sup.get_cell()).await?;
    state.children.insert(tenant.get_id(), args);
    let mut routing = state.node.routing.write();
    routing.by_domain.insert(cfg.domain.to_ascii_lowercase(), tenant.clone());
    for d in &cfg.dids {
        routing.by_did.insert(d.number.clone(), tenant.clone());
    }
    Ok(())
}

fn unroute(node: &Node, cfg: &TenantConfig) {
    let mut routing = node.routing.write();
    routing.by_domain.remove(&cfg.domain.to_ascii_lowercase());
    for d in &cfg.dids {
        routing.by_did.remove(&d.number);
    }
}
