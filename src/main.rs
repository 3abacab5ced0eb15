use clap::Parser;

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = extblk::cli::Cli::parse();
    match extblk::cli::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("extblk: {e:#}");
            std::process::exit(1);
        }
    }
}
