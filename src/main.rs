//! The `crossbar` command.

use crossbar::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage:
  crossbar run [--config FILE]      start a node (default config/crossbar.toml)
  crossbar check-config [--config FILE]  validate the configuration and exit";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cmd = args.first().map(String::as_str).unwrap_or("");
    let mut config_path = PathBuf::from("config/crossbar.toml");
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--config" | "-c" if i + 1 < args.len() => {
                config_path = PathBuf::from(&args[i + 1]);
                i += 2;
            }
            other => {
                eprintln!("crossbar: unknown argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let config = match Config::load(&config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("crossbar: configuration error: {e}");
            return ExitCode::from(78);
        }
    };
    match cmd {
        "check-config" => {
            println!("{}: OK ({} tenants)", config_path.display(), config.tenants.len());
            ExitCode::SUCCESS
        }
        "run" => run(config),
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
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
        let _ = node;
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return ExitCode::FAILURE,
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        eprintln!("crossbar: shutting down");
        ExitCode::SUCCESS
    })
}

fn summary(c: &Config) -> String {
    let udp: Vec<String> = c.sip.udp.iter().map(|a| a.to_string()).collect();
    let tcp: Vec<String> = c.sip.tcp.iter().map(|a| a.to_string()).collect();
    let tenants: Vec<String> = c.tenants.iter().map(|t| t.to_string()).collect();
    let tls = c.sip.tls.map(|a| format!(" tls={a}")).unwrap_or_default();
    format!(
        "SIP udp={} tcp={}{tls}, RTP {}:{}-{}, tenants: {}",
        udp.join(","),
        tcp.join(","),
        c.media.public_ip,
        c.media.rtp_port_min,
        c.media.rtp_port_max,
        tenants.join(", ")
    )
}
