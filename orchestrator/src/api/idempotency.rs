//! `Idempotency-Key` of `POST /orders`: the SQL of `order_idempotency_keys`.
//!
//! A key is reserved before the order is published, with the order id it stands for and a
//! lease: while the lease runs, another request with the key is answered 409; once the order
//! was acknowledged, the answer is stored and every retry gets it again. An order the broker
//! did not acknowledge gives the lease back, and the retry publishes the same order id again:
//! if the first record was written after all, the orchestrator's dedup by order id keeps it to
//! one saga.

use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// The longest key accepted (Stripe's too).
pub const MAX_KEY_CHARS: usize = 255;

/// What a request with a key may do.
#[derive(Debug, PartialEq)]
pub enum Reservation {
    /// It holds the key: publish the order with this id.
    Publish { order_id: Uuid },
    /// The key's answer is final: give it again.
    Replay { status: u16, body: Value },
    /// Another request with the key is publishing now.
    InProgress,
    /// The key was used with another request.
    OtherRequest,
}

/// Whether `key` is one the API takes: 1 to [`MAX_KEY_CHARS`] visible ASCII characters.
pub fn valid_key(key: &str) -> bool {
    (1..=MAX_KEY_CHARS).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic())
}

/// Reserves `key` of `caller` for the request hashed `request_hash`, for `lease`; a new key
/// stands for `new_order_id`.
///
/// # Errors
/// The database's.
pub async fn reserve(
    pool: &PgPool,
    caller: &str,
    key: &str,
    request_hash: &[u8],
    new_order_id: Uuid,
    lease: Duration,
) -> sqlx::Result<Reservation> {
    let lease_secs = lease.as_secs_f64();
    // A key swept between two statements is simply new again: one more round.
    for _ in 0..2 {
        let inserted = sqlx::query_scalar!(
            "INSERT INTO order_idempotency_keys
                 (caller, idempotency_key, request_hash, order_id, locked_until)
             VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
             ON CONFLICT (caller, idempotency_key) DO NOTHING
             RETURNING order_id",
            caller,
            key,
            request_hash,
            new_order_id,
            lease_secs,
        )
        .fetch_optional(pool)
        .await?;
        if let Some(order_id) = inserted {
            return Ok(Reservation::Publish { order_id });
        }
        // Known, without an answer, and nobody holds it (the last try failed or was cut
        // short): this request takes it over. The row lock makes this one request's.
        let taken = sqlx::query_scalar!(
            "UPDATE order_idempotency_keys
             SET locked_until = now() + make_interval(secs => $4)
             WHERE caller = $1 AND idempotency_key = $2 AND request_hash = $3
               AND response_status IS NULL
               AND (locked_until IS NULL OR locked_until <= now())
             RETURNING order_id",
            caller,
            key,
            request_hash,
            lease_secs,
        )
        .fetch_optional(pool)
        .await?;
        if let Some(order_id) = taken {
            return Ok(Reservation::Publish { order_id });
        }
        let known = sqlx::query!(
            "SELECT request_hash, response_status, response_body
             FROM order_idempotency_keys WHERE caller = $1 AND idempotency_key = $2",
            caller,
            key,
        )
        .fetch_optional(pool)
        .await?;
        let Some(known) = known else { continue };
        if known.request_hash != request_hash {
            return Ok(Reservation::OtherRequest);
        }
        return Ok(match (known.response_status, known.response_body) {
            (Some(status), Some(body)) => Reservation::Replay {
                status: u16::try_from(status).unwrap_or(202),
                body,
            },
            _ => Reservation::InProgress,
        });
    }
    Ok(Reservation::InProgress)
}

/// Stores the final answer of `key`: every retry gets it again.
///
/// # Errors
/// The database's.
pub async fn complete(
    pool: &PgPool,
    caller: &str,
    key: &str,
    status: u16,
    body: &Value,
) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE order_idempotency_keys
         SET response_status = $3, response_body = $4, locked_until = NULL
         WHERE caller = $1 AND idempotency_key = $2",
        caller,
        key,
        i16::try_from(status).unwrap_or(i16::MAX),
        body,
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Gives `key` back without an answer (the order was not acknowledged): a retry may publish
/// it again at once.
///
/// # Errors
/// The database's.
pub async fn release(pool: &PgPool, caller: &str, key: &str) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE order_idempotency_keys SET locked_until = NULL
         WHERE caller = $1 AND idempotency_key = $2 AND response_status IS NULL",
        caller,
        key,
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Deletes up to `limit` keys made more than `retention_secs` ago; how many it deleted.
///
/// # Errors
/// The database's.
pub async fn sweep(pool: &PgPool, retention_secs: u64, limit: i64) -> sqlx::Result<u64> {
    // Cast out here: `expr as T` among the macro's arguments would be a type override.
    let retention_secs = retention_secs as f64;
    Ok(sqlx::query!(
        "DELETE FROM order_idempotency_keys WHERE ctid IN (
             SELECT ctid FROM order_idempotency_keys
             WHERE created_at < now() - make_interval(secs => $1)
             ORDER BY created_at LIMIT $2)",
        retention_secs,
        limit,
    )
    .execute(pool)
    .await?
    .rows_affected())
}

#[cfg(test)]
mod tests {
    use super::valid_key;

    #[test]
    fn keys_are_short_visible_ascii() {
        for good in ["a", "order-7f3e", &"k".repeat(255), "A~!#$%&'*+.^_`|"] {
            assert!(valid_key(good), "{good:?}");
        }
        for bad in ["", " ", "a b", "é", "a\tb", &"k".repeat(256)] {
            assert!(!valid_key(bad), "{bad:?}");
        }
    }
}
