//! The cluster layout in ZooKeeper: `init`, the role folders and partition folders,
//! `partition_num` (set, and doubled with a version check), and the record of the last
//! doubling.

use super::*;

/// Set the data of the persistent node at `path`, creating it when it does not exist.
async fn put(client: &Client, path: &str, data: &[u8]) -> Result<(), RegistryError> {
    match client.set_data(path, data, None).await {
        Ok(_) => Ok(()),
        Err(ZkError::NoNode) => match client.create(path, data, &PERSISTENT).await {
            Ok(_) => Ok(()),
            Err(ZkError::NodeExists) => client
                .set_data(path, data, None)
                .await
                .map(|_| ())
                .map_err(zk_err),
            Err(e) => Err(zk_err(e)),
        },
        Err(e) => Err(zk_err(e)),
    }
}

impl ZkShared {
    pub(crate) async fn init_layout(&self, layout: &Layout) -> Result<(), RegistryError> {
        let (_, client) = self.client()?;
        // Check everything before writing anything.
        let mut existing = std::collections::HashMap::new();
        for role in Role::ALL {
            if let Some(n) = self.get_partition_num(&client, role).await? {
                existing.insert(role, n);
            }
        }
        check_layout(layout, |role| existing.get(&role).copied())?;
        for role in Role::ALL {
            client
                .mkdir(&self.role_path(role), &PERSISTENT)
                .await
                .map_err(zk_err)?;
            if let Some(n) = layout.partitions(role) {
                self.create_partition_folders(&client, role, n).await?;
                let path = self.partition_num_path(role);
                match client
                    .create(&path, n.to_string().as_bytes(), &PERSISTENT)
                    .await
                {
                    Ok(_) => {}
                    Err(ZkError::NodeExists) => {
                        // Raced with another initialiser: accept only the same count.
                        if let Some(existing) = self.get_partition_num(&client, role).await? {
                            if existing != n {
                                return Err(RegistryError::AlreadyInitialized {
                                    role,
                                    existing,
                                    wanted: n,
                                });
                            }
                        }
                    }
                    Err(e) => return Err(zk_err(e)),
                }
            }
        }
        Ok(())
    }

    async fn create_partition_folders(
        &self,
        client: &Client,
        role: Role,
        n: u32,
    ) -> Result<(), RegistryError> {
        for p in 0..n {
            client
                .mkdir(&self.folder(role, p), &PERSISTENT)
                .await
                .map_err(zk_err)?;
        }
        Ok(())
    }

    pub(crate) async fn is_initialized(&self) -> Result<bool, RegistryError> {
        let (_, client) = self.client()?;
        for role in Role::ALL.into_iter().filter(Role::is_partitioned) {
            if self.get_partition_num(&client, role).await?.is_none() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    pub(crate) async fn set_partition_num(&self, role: Role, n: u32) -> Result<(), RegistryError> {
        check_power_of_two(n)?;
        let (_, client) = self.client()?;
        self.create_partition_folders(&client, role, n).await?;
        put(
            &client,
            &self.partition_num_path(role),
            n.to_string().as_bytes(),
        )
        .await
    }

    pub(crate) async fn double_partitions(
        &self,
        role: Role,
        from: u32,
        to: u32,
    ) -> Result<(), RegistryError> {
        let (_, client) = self.client()?;
        let path = self.partition_num_path(role);
        let changed = |found| RegistryError::PartitionNumChanged {
            role,
            expected: from,
            found,
        };
        let (data, stat) = client.get_data(&path).await.map_err(|e| match e {
            ZkError::NoNode => RegistryError::NotInitialized,
            e => zk_err(e),
        })?;
        let found = parse_count(&data).ok_or_else(|| {
            RegistryError::BadData(format!("{path}: {:?}", String::from_utf8_lossy(&data)))
        })?;
        if found != from {
            return Err(changed(found));
        }
        self.create_partition_folders(&client, role, to).await?;
        match client
            .set_data(&path, to.to_string().as_bytes(), Some(stat.version))
            .await
        {
            Ok(_) => Ok(()),
            Err(ZkError::BadVersion) => {
                let now = self.get_partition_num(&client, role).await?.unwrap_or(0);
                Err(changed(now))
            }
            Err(e) => Err(zk_err(e)),
        }
    }

    fn last_doubling_path(&self, role: Role) -> String {
        format!("{}/{}/last_doubling", self.base, role.as_str())
    }

    pub(crate) async fn record_doubling(
        &self,
        role: Role,
        d: Doubling,
    ) -> Result<(), RegistryError> {
        let (_, client) = self.client()?;
        let data = serde_json::to_vec(&d).expect("serializing a Doubling cannot fail");
        put(&client, &self.last_doubling_path(role), &data).await
    }

    pub(crate) async fn last_doubling(
        &self,
        role: Role,
    ) -> Result<Option<Doubling>, RegistryError> {
        let (_, client) = self.client()?;
        let path = self.last_doubling_path(role);
        match client.get_data(&path).await {
            Ok((data, _)) => serde_json::from_slice(&data)
                .map(Some)
                .map_err(|e| RegistryError::BadData(format!("{path}: {e}"))),
            Err(ZkError::NoNode) => Ok(None),
            Err(e) => Err(zk_err(e)),
        }
    }
}
