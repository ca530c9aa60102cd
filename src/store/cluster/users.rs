//! User accounts in cluster mode: ids from one Redis counter, documents in
//! MongoDB.

use super::{error::ClusterError, mongo, scripts, shared::Shared};
use crate::store::types::NewUser;

/// Registers `users`; per user, its new id, or `None` when the username or
/// its skeleton is taken. Ids come from one Redis counter (`INCRBY`, atomic across nodes);
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
            .map(|(k, &i)| mongo::user_doc(first + k as u64, &users[i]))
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
            // Refused for a taken username or skeleton, or for an id in use
            // (retried with new ids).
            let names: Vec<&str> = refused.iter().map(|&i| users[i].username.as_str()).collect();
            let skeletons: Vec<&str> = refused.iter().map(|&i| users[i].skeleton.as_str()).collect();
            let taken = mongo::existing(&shared.db, "username", &names).await?;
            let alike = mongo::existing(&shared.db, "skeleton", &skeletons).await?;
            refused
                .into_iter()
                .filter(|&i| !taken.contains(&users[i].username) && !alike.contains(&users[i].skeleton))
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
