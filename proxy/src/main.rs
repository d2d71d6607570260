use clap::Parser;

fn main() {
    let cli = weft::cli::Cli::parse();
    let default_level = match cli.command {
        weft::cli::Command::Node(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(weft::cli::run(cli)) {
        eprintln!("weft: {e:#}");
        std::process::exit(1);
    }
}
