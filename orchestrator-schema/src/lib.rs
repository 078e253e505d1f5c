//! The orchestrator's database schema, apart from the server: its migrations, and the
//! extensions they need. The orchestrator applies them at start (`db::open`); the admin step
//! (`sagactl provision database`) creates the extensions beforehand, because a service role may
//! not. Both depend on this crate, so the tool knows what the server's schema needs without
//! building the server (axum, hyper, governor).

use sqlx::migrate::Migrator;

/// The orchestrator's own migrations (on top of the messaging tables).
pub static MIGRATIONS: Migrator = sqlx::migrate!("../migrations/orchestrator");

/// The extensions the orchestrator's migrations use (pg_trgm: 1005's trigram index). A
/// service role may not create an extension (it has no CREATE on the database), so the admin
/// step (`sagactl provision database`) creates them; the migration's `CREATE EXTENSION IF NOT
/// EXISTS` then finds them. A test below keeps this list and the migrations' `CREATE
/// EXTENSION` statements the same.
pub const EXTENSIONS: &[&str] = &["pg_trgm"];

#[cfg(test)]
mod tests {
    use super::*;

    /// The extension each `CREATE EXTENSION [IF NOT EXISTS] name` of `sql` creates, outside
    /// comments.
    fn created_extensions(sql: &str) -> Vec<String> {
        let code: String = sql
            .lines()
            .map(|line| line.split("--").next().unwrap_or_default())
            .collect::<Vec<_>>()
            .join(" ");
        let words: Vec<String> = code
            .split(|c: char| c.is_whitespace() || c == ';')
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect();
        let mut names = Vec::new();
        for (i, pair) in words.windows(2).enumerate() {
            if pair != ["create", "extension"] {
                continue;
            }
            let rest = &words[i + 2..];
            let name = match rest {
                [a, b, c, name, ..] if a == "if" && b == "not" && c == "exists" => name,
                [name, ..] => name,
                [] => continue,
            };
            names.push(name.trim_matches('"').to_owned());
        }
        names
    }

    #[test]
    fn the_extensions_are_those_the_migrations_create() {
        let mut created: Vec<String> = MIGRATIONS
            .iter()
            .flat_map(|m| created_extensions(&m.sql))
            .collect();
        created.sort();
        created.dedup();
        let mut listed: Vec<&str> = EXTENSIONS.to_vec();
        listed.sort_unstable();
        assert_eq!(
            created, listed,
            "EXTENSIONS must name every extension the orchestrator's migrations create: the \
             admin step creates exactly those"
        );
    }

    #[test]
    fn a_create_extension_is_read_with_or_without_if_not_exists_and_not_from_comments() {
        let sql = "-- CREATE EXTENSION commented;\nCREATE EXTENSION IF NOT EXISTS pg_trgm;\n\
                   create extension \"uuid-ossp\" WITH SCHEMA public;";
        assert_eq!(created_extensions(sql), ["pg_trgm", "uuid-ossp"]);
    }
}
