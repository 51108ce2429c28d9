//! Retrieve, then rerank: the seed spec's chatbot pipeline with `RerankClient`.
//!
//! 1. Retrieve `top_k * 3` candidates (default 15) with a (fake, in-memory) similarity search.
//! 2. Represent each as `"{title}: {description}"` and rerank them against the query.
//! 3. Keep the best `top_k` (default 5). If reranking fails, keep the similarity order.
//!
//! ```text
//! make run                      # or any worker pool + sidecar
//! cargo run --example rag_pipeline -- "AI tools for productivity"
//! cargo run --example rag_pipeline -- --http http://127.0.0.1:8001 --top-k 3 "note taking"
//! cargo run --example rag_pipeline -- --nats nats://127.0.0.1:4222 "weather"
//! ```

use std::collections::HashSet;
use std::time::Duration;

use rerank_service::client::RerankClient;

#[derive(Debug, Clone)]
struct Project {
    title: &'static str,
    description: &'static str,
}

const PROJECTS: [(&str, &str); 24] = [
    (
        "TaskFlow",
        "A task management app built with React and Node.js",
    ),
    (
        "MailMate",
        "An AI-powered writing assistant that helps with emails",
    ),
    ("SkyCast", "A weather widget for the desktop"),
    (
        "NoteNest",
        "A note taking app with markdown and sync across devices",
    ),
    (
        "FocusTimer",
        "A pomodoro timer that blocks distracting websites for productivity",
    ),
    (
        "MeetNotes",
        "AI meeting assistant that transcribes and summarizes calls",
    ),
    ("CodePilot", "An AI pair programmer for the terminal"),
    (
        "BudgetBee",
        "Personal finance tracker with charts and budgets",
    ),
    ("RecipeBox", "Save and organize recipes from any website"),
    (
        "FitLog",
        "Workout logger for strength training with progress graphs",
    ),
    (
        "DocuSearch",
        "Semantic search over your documents using embeddings",
    ),
    (
        "CalSync",
        "Calendar tool that schedules tasks into free time automatically",
    ),
    (
        "InboxZero",
        "Email client that uses AI to triage and prioritize your inbox",
    ),
    (
        "PhotoSort",
        "Organize photos by faces and places on your laptop",
    ),
    (
        "LangTutor",
        "Practice a new language with an AI conversation partner",
    ),
    ("ShipIt", "Deploy static websites from git with one command"),
    (
        "HabitHero",
        "Track daily habits and streaks to stay productive",
    ),
    (
        "ReadLater",
        "Save articles to read later, with AI summaries",
    ),
    (
        "SlideGen",
        "Generate presentation slides from an outline with AI",
    ),
    ("PlantPal", "Reminds you when to water your plants"),
    (
        "VoiceMemo",
        "Record voice notes and turn them into tasks with AI",
    ),
    ("KanbanLite", "A minimal kanban board for small teams"),
    ("StormWatch", "Severe weather alerts for your location"),
    (
        "WikiBot",
        "Chatbot that answers questions from your team's wiki",
    ),
];

fn words(text: &str) -> HashSet<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() > 1)
        .map(str::to_lowercase)
        .collect()
}

/// Stand-in for the vector search: Jaccard similarity of word sets, best first.
fn similarity_search(query: &str, limit: usize) -> Vec<Project> {
    let q = words(query);
    let mut scored: Vec<(f32, Project)> = PROJECTS
        .iter()
        .map(|&(title, description)| {
            let d = words(&format!("{title} {description}"));
            let shared = q.intersection(&d).count() as f32;
            let union = q.union(&d).count().max(1) as f32;
            (shared / union, Project { title, description })
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored.into_iter().take(limit).map(|(_, p)| p).collect()
}

struct Args {
    query: String,
    top_k: usize,
    http: Option<String>,
    nats: String,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        query: "AI tools for productivity".into(),
        top_k: 5,
        http: None,
        nats: std::env::var("RERANK_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--top-k" => {
                let value = it.next().ok_or("--top-k needs a number")?;
                args.top_k = value.parse().map_err(|e| format!("--top-k {value}: {e}"))?;
            }
            "--http" => args.http = Some(it.next().ok_or("--http needs a URL")?),
            "--nats" => args.nats = it.next().ok_or("--nats needs a URL")?,
            other if other.starts_with("--") => return Err(format!("unknown option {other}")),
            query => args.query = query.to_string(),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = parse_args()?;
    let builder = RerankClient::builder()
        .retries(3)
        .backoff_base(Duration::from_secs(1))
        .timeout(Duration::from_secs(60));
    let client = match &args.http {
        Some(url) => builder.http(url.clone()),
        None => {
            // A missing NATS server is just another reason to fall back.
            match async_nats::connect(&args.nats).await {
                Ok(nats) => builder.nats(nats, rerank_service::wire::SUBJECT_V1),
                Err(e) => {
                    eprintln!(
                        "NATS at {} is not reachable ({e}); using similarity order",
                        args.nats
                    );
                    for project in similarity_search(&args.query, args.top_k) {
                        println!("{}: {}", project.title, project.description);
                    }
                    return Ok(());
                }
            }
        }
    }
    .build()?;

    let candidates = similarity_search(&args.query, args.top_k * 3);
    println!(
        "query: {}\n{} candidates from similarity search",
        args.query,
        candidates.len()
    );
    let best = client
        .rerank_top_k(&args.query, candidates, args.top_k, |p| {
            format!("{}: {}", p.title, p.description)
        })
        .await;
    println!("top {} after reranking:", best.len());
    for (rank, project) in best.iter().enumerate() {
        println!(
            "{:>2}. {}: {}",
            rank + 1,
            project.title,
            project.description
        );
    }
    Ok(())
}
