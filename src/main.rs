//! The `crossbar` command.

use crossbar::config::Config;

/// jemalloc. Allocation was 15 % of a call's CPU with glibc's malloc; mimalloc
/// (sessions 2-9) spent ~19 % of it in its allocator, mostly in blocks freed by
/// the other worker thread (a message is parsed on one, its call runs on
/// another). jemalloc used 4-8 % less CPU per call than mimalloc v3
/// (`bench/cps-pair.sh`, 1,200 and 2,000 calls/s, six runs, 2026-11-23).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage:
  crossbar run [--config FILE]                       start a node (default config/crossbar.toml)
  crossbar check-config [--config FILE]              validate the configuration and exit
  crossbar status                                    calls in progress, media ports in use (running node)
  crossbar cdr list --tenant ID [--json] [--limit N] a tenant's call records, oldest first
  crossbar events list --tenant ID [--limit N]       a tenant's event stream (JSON lines)
  crossbar recording list --tenant ID                a tenant's recordings (JSON)
  crossbar recording get --tenant ID CDR_ID --out FILE   a call's recording (WAV)
  crossbar keys rotate --tenant ID                    new data key for the tenant's new writes
  crossbar keys rewrap                               new master key: re-wraps every tenant key (node stopped)
  crossbar tenant delete --tenant ID                 crypto-shreds a tenant: keys destroyed, records deleted (node stopped)
  crossbar tenant set-plan --tenant ID PLAN          starter | pro | enterprise with the plan's own limits
                                                     (per-tenant overrides cleared), effective on the next call
Commands other than run talk to the running node through <data_dir>/admin.sock,
or open the store themselves when no node runs.";

/// Parsed command-line options shared by the subcommands.
#[derive(Default)]
struct Opts {
    positional: Vec<String>,
    tenant: Option<String>,
    json: bool,
    limit: Option<usize>,
    out: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut config_path = PathBuf::from("config/crossbar.toml");
    let mut o = Opts::default();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned();
        match (args[i].as_str(), value) {
            ("--config" | "-c", Some(v)) => config_path = PathBuf::from(v),
            ("--tenant", Some(v)) => o.tenant = Some(v),
            ("--out", Some(v)) => o.out = Some(PathBuf::from(v)),
            ("--limit", Some(v)) => match v.parse() {
                Ok(n) => o.limit = Some(n),
                Err(_) => {
                    eprintln!("crossbar: --limit needs a number, got {v:?}");
                    return ExitCode::from(2);
                }
            },
            ("--json", _) => {
                o.json = true;
                i += 1;
                continue;
            }
            (a, _) if a.starts_with("--") => {
                eprintln!("crossbar: unknown or incomplete option {a:?}\n{USAGE}");
                return ExitCode::from(2);
            }
            (a, _) => {
                o.positional.push(a.to_string());
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    let pos: Vec<&str> = o.positional.iter().map(String::as_str).collect();
    let config = match Config::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("crossbar: configuration error: {e}");
            return ExitCode::from(78);
        }
    };
    match pos.as_slice() {
        ["check-config"] => {
            println!("{}: OK ({} tenants)", config_path.display(), config.tenants.len());
            ExitCode::SUCCESS
        }
        ["run"] => run(config),
        ["cdr", "list"] | ["events", "list"] | ["recording", "list"] | ["recording", "get", _] | ["tenant", "set-plan", _] | ["keys", "rotate"] | ["tenant", "delete"] => admin_command(config, &pos, &o),
        ["keys", "rewrap"] => rewrap(config),
        ["status"] => admin_command(config, &pos, &o),
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

/// Runs an admin command against the running node, or the store when no node runs.
fn admin_command(config: Config, pos: &[&str], o: &Opts) -> ExitCode {
    use crossbar::console::admin::{self, Request};
    let tenant = o.tenant.clone().unwrap_or_default();
    if tenant.is_empty() && pos != ["status"] {
        eprintln!("crossbar: --tenant ID is required");
        return ExitCode::from(2);
    }
    let limit = o.limit.unwrap_or(100);
    let req = match pos {
        ["cdr", "list"] => Request::CdrList { tenant, after: None, limit },
        ["events", "list"] => Request::EventsList { tenant, after: None, limit },
        ["recording", "list"] => Request::RecordingList { tenant, limit },
        ["recording", "get", id] => {
            if o.out.is_none() {
                eprintln!("crossbar: --out FILE is required");
                return ExitCode::from(2);
            }
            Request::RecordingGet { tenant, id: id.to_string() }
        }
        ["tenant", "set-plan", plan] => Request::SetPlan { tenant, plan: plan.to_string(), limits: Some(Default::default()) },
        ["keys", "rotate"] => Request::KeysRotate { tenant },
        ["status"] => Request::NodeStatus,
        ["tenant", "delete"] => Request::TenantDelete { tenant },
        _ => unreachable!("main only dispatches the commands matched above"),
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("crossbar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let answer = rt.block_on(async {
        let sock = admin::socket_path(&config.node.data_dir);
        match admin::request(&sock, &req).await {
            Ok(Some(answer)) => Ok(answer),
            Ok(None) => {
                // No node runs: open the store directly (it is not locked).
                let vault = crossbar::actors::node::open_vault(&config).await.map_err(|e| e.to_string())?;
                Ok(admin::execute(&vault, None, req).await)
            }
            Err(e) => Err(format!("cannot reach the node at {}: {e}", sock.display())),
        }
    });
    let value = match answer {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            eprintln!("crossbar: {e}");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("crossbar: {e}");
            return ExitCode::FAILURE;
        }
    };
    match pos {
        ["recording", "get", _] => {
            use base64::Engine;
            let out = o.out.as_ref().expect("checked above");
            let wav = match value["wav_base64"].as_str().map(|b| base64::engine::general_purpose::STANDARD.decode(b)) {
                Some(Ok(w)) => w,
                _ => {
                    eprintln!("crossbar: the node sent no recording data");
                    return ExitCode::FAILURE;
                }
            };
            if let Err(e) = std::fs::write(out, &wav) {
                eprintln!("crossbar: cannot write {}: {e}", out.display());
                return ExitCode::FAILURE;
            }
            println!("{}: {} bytes", out.display(), wav.len());
        }
        ["cdr", "list"] if !o.json => {
            println!("{:<31} {:<9} {:<16} {:<16} {:<24} {:>8} {:<12} {:<11}", "id", "direction", "from", "to", "start", "billsec", "disposition", "state");
            for c in value.as_array().into_iter().flatten() {
                let s = |k: &str| c[k].as_str().unwrap_or("-").to_string();
                let bill = c["billable_s"].as_f64().map(|b| format!("{b:.1}")).unwrap_or_else(|| "-".into());
                println!("{:<31} {:<9} {:<16} {:<16} {:<24} {:>8} {:<12} {:<11}", s("id"), s("direction"), s("from"), s("to"), s("start"), bill, s("disposition"), s("state"));
            }
        }
        ["events", "list"] => {
            for e in value.as_array().into_iter().flatten() {
                println!("{e}");
            }
        }
        _ => println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default()),
    }
    ExitCode::SUCCESS
}

fn run(config: Config) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CROSSBAR_LOG").unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.node.log_level));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("crossbar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    crossbar::sip::transport::install_crypto_provider();
    // Every call holds 4 media sockets: take the hard open-files limit, not the default soft 1024.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::info!("open files limit: {n} (each call uses 4 media sockets)"),
        Err(e) => tracing::warn!("cannot raise the open files limit: {e}"),
    }
    rt.block_on(async move {
        let summary = summary(&config);
        let (node, _sup) = match crossbar::actors::node::start(config).await {
            Ok(v) => v,
            Err(e) => {
                eprintln!("crossbar: cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!("crossbar ready: {summary}");
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return ExitCode::FAILURE,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        eprintln!("crossbar: shutting down");
        if let Err(e) = node.writer.flush().await {
            eprintln!("crossbar: could not flush the last records: {e}");
        }
        ExitCode::SUCCESS
    })
}

/// Replaces the master key: a new key is generated, every tenant's data key is
/// re-wrapped under it, and the key file is swapped. The node must be stopped
/// (the embedded store is locked while it runs).
fn rewrap(config: Config) -> ExitCode {
    use crossbar::crypto::MasterKey;
    if std::env::var_os("CROSSBAR_MASTER_KEY").is_some() {
        eprintln!("crossbar: the master key comes from CROSSBAR_MASTER_KEY; rewrap works on the key file (unset it, or rewrap on a node that uses a file)");
        return ExitCode::FAILURE;
    }
    let current = config.store.master_key_file.clone();
    let with_suffix = |s: &str| {
        let mut p = current.clone().into_os_string();
        p.push(s);
        PathBuf::from(p)
    };
    let (fresh, retired) = (with_suffix(".new"), with_suffix(".retired"));
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("crossbar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: Result<u64, String> = rt.block_on(async {
        if tokio::net::UnixStream::connect(crossbar::console::admin::socket_path(&config.node.data_dir)).await.is_ok() {
            return Err("a node is running on this data directory: stop it first".into());
        }
        let vault = crossbar::actors::node::open_vault(&config).await.map_err(|e| e.to_string())?;
        // Written (0600) before anything is re-wrapped, so a crash in between loses nothing.
        let (new_key, _) = MasterKey::load_or_generate(&fresh).map_err(|e| e.to_string())?;
        vault.rewrap(new_key).await.map_err(|e| e.to_string())
    });
    match result {
        Ok(n) => {
            if let Err(e) = std::fs::rename(&current, &retired).and_then(|_| std::fs::rename(&fresh, &current)) {
                eprintln!("crossbar: re-wrapped {n} keys under {}, but could not move it into place: {e}; move it over {} by hand", fresh.display(), current.display());
                return ExitCode::FAILURE;
            }
            println!("re-wrapped {n} tenant data keys under a new master key, now in {}.", current.display());
            println!("the old key is in {}: back up the new key, then delete the old one.", retired.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("crossbar: rewrap failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn summary(c: &Config) -> String {
    let udp: Vec<String> = c.sip.udp.iter().map(|a| a.to_string()).collect();
    let tcp: Vec<String> = c.sip.tcp.iter().map(|a| a.to_string()).collect();
    let tenants: Vec<String> = c.tenants.iter().map(|t| t.to_string()).collect();
    let tls = c.sip.tls.map(|a| format!(" tls={a}")).unwrap_or_default();
    // Where a person goes: each tenant's softphone page (Host = tenant subdomain).
    let web = match &c.http {
        Some(h) => {
            let port = h.listen.port();
            let phones: Vec<String> = c.tenants.iter().map(|t| format!("http://{}:{port}/phone", t.domain)).collect();
            format!(", HTTP {} (SIP over WebSocket ws://HOST:{port}/sip; softphone {})", h.listen, phones.join(" "))
        }
        None => String::new(),
    };
    format!(
        "SIP udp={} tcp={}{tls}, RTP {}:{}-{}{web}, admin socket {}, tenants: {}",
        udp.join(","),
        tcp.join(","),
        c.media.public_ip,
        c.media.rtp_port_min,
        c.media.rtp_port_max,
        crossbar::console::admin::socket_path(&c.node.data_dir).display(),
        tenants.join(", ")
    )
}
