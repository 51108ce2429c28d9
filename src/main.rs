//! `rerank`: parse the command line, run the subcommand, report errors on one line.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = rerank_service::cli::Cli::parse();
    if cli.runs_model() {
        // Before the runtime starts its threads: each thread that allocates first gets an arena.
        rerank_service::engine::reuse_freed_pass_buffers();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli.run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
