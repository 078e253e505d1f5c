//! The messaging crate against the real PostgreSQL (`TEST_DATABASE_URL`, a server URL without a
//! database name) and the real broker (`KAFKA_BROKERS`), each test in a schema and topics of
//! its own.

mod inbox;
mod kept_connection;
mod relay;
mod relay_listen;
mod retention;
mod roles;
mod side_pool;
