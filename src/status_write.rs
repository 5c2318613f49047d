//! Status writes that never clobber another writer's: hosts, finalize and the operator all write
//! BackupSession (and RestoreBatch) status, each guarded by the resourceVersion it read.

use kube::api::{Api, PostParams};

/// Reads object `name`, lets `change` edit it, and writes its status back guarded by the
/// resourceVersion read; on a conflict (another host or the operator wrote meanwhile) it starts over
/// from the newer object. `change` returns false when there is nothing to write.
pub async fn update_status<K>(
    api: &Api<K>,
    name: &str,
    mut change: impl FnMut(&mut K) -> bool,
) -> Result<(), kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    loop {
        let mut current = api.get(name).await?;
        if !change(&mut current) {
            return Ok(());
        }
        match api.replace_status(name, &PostParams::default(), &current).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(err) => return Err(err),
        }
    }
}
