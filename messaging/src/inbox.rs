//! The inbox: which messages this service has already handled.

use std::collections::HashSet;

use sqlx::PgConnection;
use uuid::Uuid;

/// Records a delivery of each of `items` in the current transaction, in one statement, and
/// keeps those that are their message's first delivery ([`keep_fresh`]). `delivery` says an
/// item's message id and the span it is handled in.
///
/// # Errors
/// Database errors; the caller's transaction should then be rolled back and retried.
pub async fn keep_first_deliveries<T>(
    tx: &mut PgConnection,
    items: Vec<T>,
    delivery: impl Fn(&T) -> (Uuid, &tracing::Span),
) -> sqlx::Result<Vec<T>> {
    let message_ids: Vec<Uuid> = items.iter().map(|item| delivery(item).0).collect();
    let fresh = sqlx::query_scalar!(
        r#"SELECT message_id AS "message_id!" FROM inbox_first_deliveries($1) WHERE fresh"#,
        &message_ids
    )
    .fetch_all(tx)
    .await?;
    Ok(keep_fresh(items, fresh, delivery))
}

/// Keeps the items of `items` that are their message's first delivery: their message is one of
/// `fresh` (those the database function `inbox_first_deliveries`, messaging migration 8, found
/// delivered for the first time when it counted `items`), and no earlier item of `items` has
/// it. Every other item is logged in its span as a redelivery and dropped. For a handler whose
/// own statement calls that function (one round trip fewer).
pub fn keep_fresh<T>(
    items: Vec<T>,
    fresh: impl IntoIterator<Item = Uuid>,
    delivery: impl Fn(&T) -> (Uuid, &tracing::Span),
) -> Vec<T> {
    let mut fresh: HashSet<Uuid> = fresh.into_iter().collect();
    items
        .into_iter()
        .filter(|item| {
            let (message_id, span) = delivery(item);
            // Only the first item of a message may be its first delivery.
            let first = fresh.remove(&message_id);
            if !first {
                span.in_scope(|| tracing::debug!(%message_id, "redelivered message ignored"));
            }
            first
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message counted fresh keeps its first item only; a message not counted fresh keeps
    /// none, wherever its items are.
    #[test]
    fn only_the_first_item_of_a_fresh_message_is_kept() {
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let items: Vec<(usize, Uuid, tracing::Span)> = [a, b, a, c, b]
            .into_iter()
            .enumerate()
            .map(|(i, id)| (i, id, tracing::Span::none()))
            .collect();
        let kept = keep_fresh(items, [a, b], |(_, id, span)| (*id, span));
        let kept: Vec<usize> = kept.into_iter().map(|(i, _, _)| i).collect();
        assert_eq!(kept, [0, 1], "a's and b's first items; c was not fresh");
    }
}
