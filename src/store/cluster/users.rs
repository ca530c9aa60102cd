//! User accounts in cluster mode: ids from one Redis counter, documents in
//! MongoDB.

use super::{error::ClusterError, mongo, scripts, shared::Shared};
use crate::store::types::NewUser;

/// Registers `users`; per user, its new id, or `None` when the username is
/// taken. Ids come from one Redis counter (`INCRBY`, atomic across nodes);
/// an id MongoDB already has (the counter was lost) raises the counter past
/// the highest id in use and is retried.
pub(super) async fn insert_new_users(shared: &Shared, users: &[NewUser]) -> Result<Vec<Option<u64>>, ClusterError> {
    let mut out = vec![None; users.len()];
    let mut pending: Vec<usize> = (0..users.len()).collect();
    let mut redis = shared.redis.clone();
    for _ in 0..5 {
        if pending.is_empty() {
            break;
        }
        let last: u64 = redis::cmd("INCRBY")
            .arg(scripts::USER_IDS_KEY)
            .arg(pending.len())
            .query_async(&mut redis)
            .await?;
        let first = last + 1 - pending.len() as u64;
        let docs = pending
            .iter()
            .enumerate()
            .map(|(k, &i)| {
                let u = &users[i];
                mongo::user_doc(
                    first + k as u64,
                    &u.username,
                    &u.nickname,
                    &u.password_hash,
                    u.created_at_ms,
                )
            })
            .collect();
        let refused = mongo::insert_users(&shared.db, docs).await?;
        for (k, &i) in pending.iter().enumerate() {
            if !refused.contains(&k) {
                out[i] = Some(first + k as u64);
            }
        }
        let refused: Vec<usize> = pending
            .iter()
            .enumerate()
            .filter(|(k, _)| refused.contains(k))
            .map(|(_, &i)| i)
            .collect();
        pending = if refused.is_empty() {
            Vec::new()
        } else {
            let names: Vec<&str> = refused.iter().map(|&i| users[i].username.as_str()).collect();
            let taken = mongo::existing_usernames(&shared.db, &names).await?;
            refused
                .into_iter()
                .filter(|&i| !taken.contains(&users[i].username))
                .collect()
        };
        if !pending.is_empty() {
            let max = mongo::max_user_id(&shared.db).await?;
            let _: i64 = scripts::RAISE
                .key(scripts::USER_IDS_KEY)
                .arg(max)
                .invoke_async(&mut redis)
                .await?;
        }
    }
    if !pending.is_empty() {
        return Err(ClusterError::Protocol("could not find free user ids".into()));
    }
    Ok(out)
}
