//! In-process backend: a shared in-memory tree with the same semantics as the ZooKeeper layout.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::{
    check_layout, lock, publish, Doubling, Layout, Member, NodeInfo, RegInner, RegistryError, Role,
    RoleView,
};

#[derive(Default)]
struct Folder {
    /// Next sequence number (like ZooKeeper, per parent folder).
    next_seq: u64,
    nodes: BTreeMap<u64, NodeInfo>,
}

#[derive(Default)]
struct RoleTree {
    partition_num: Option<u32>,
    /// Partition folders (key 0 is the role folder itself for non-partitioned roles).
    folders: BTreeMap<u32, Folder>,
}

#[derive(Default)]
struct State {
    /// A role is present iff its folder exists.
    roles: HashMap<Role, RoleTree>,
    views: HashMap<Role, watch::Sender<Arc<RoleView>>>,
    doublings: HashMap<Role, Doubling>,
}

pub(crate) struct EmbShared {
    pub(crate) cluster: String,
    state: Mutex<State>,
}

impl State {
    fn view(&self, role: Role) -> RoleView {
        let Some(tree) = self.roles.get(&role) else {
            return RoleView::default();
        };
        let partitions = tree
            .folders
            .iter()
            .map(|(p, f)| {
                let members = f
                    .nodes
                    .iter()
                    .map(|(id, info)| Member {
                        id: *id,
                        name: format!("node-{id:010}"),
                        info: info.clone(),
                    })
                    .collect();
                (*p, members)
            })
            .collect();
        let partition_num = if role.is_partitioned() {
            tree.partition_num.unwrap_or(0)
        } else {
            1
        };
        RoleView {
            partition_num,
            partitions,
        }
    }

    fn publish(&self, role: Role) {
        if let Some(tx) = self.views.get(&role) {
            publish(tx, self.view(role));
        }
    }

    fn role_tree(&mut self, role: Role) -> &mut RoleTree {
        self.roles.entry(role).or_insert_with(|| {
            let mut tree = RoleTree::default();
            if !role.is_partitioned() {
                tree.folders.insert(0, Folder::default());
            }
            tree
        })
    }

    fn ensure_partitions(&mut self, role: Role, n: u32) {
        let tree = self.role_tree(role);
        for p in 0..n {
            tree.folders.entry(p).or_default();
        }
    }
}

impl EmbShared {
    pub(crate) fn new(cluster: &str) -> EmbShared {
        EmbShared {
            cluster: cluster.to_owned(),
            state: Mutex::new(State::default()),
        }
    }

    pub(crate) fn init_layout(&self, layout: &Layout) -> Result<(), RegistryError> {
        let mut st = lock(&self.state);
        check_layout(layout, |role| {
            st.roles.get(&role).and_then(|t| t.partition_num)
        })?;
        for role in Role::ALL {
            match layout.partitions(role) {
                Some(n) => {
                    st.ensure_partitions(role, n);
                    st.role_tree(role).partition_num = Some(n);
                }
                None => {
                    st.role_tree(role);
                }
            }
            st.publish(role);
        }
        Ok(())
    }

    pub(crate) fn is_initialized(&self) -> bool {
        let st = lock(&self.state);
        Role::ALL
            .into_iter()
            .filter(Role::is_partitioned)
            .all(|r| st.roles.get(&r).is_some_and(|t| t.partition_num.is_some()))
    }

    pub(crate) fn set_partition_num(&self, role: Role, n: u32) {
        let mut st = lock(&self.state);
        st.ensure_partitions(role, n);
        st.role_tree(role).partition_num = Some(n);
        st.publish(role);
    }

    pub(crate) fn record_doubling(&self, role: Role, d: Doubling) {
        lock(&self.state).doublings.insert(role, d);
    }

    pub(crate) fn last_doubling(&self, role: Role) -> Option<Doubling> {
        lock(&self.state).doublings.get(&role).copied()
    }

    pub(crate) fn double_partitions(
        &self,
        role: Role,
        from: u32,
        to: u32,
    ) -> Result<(), RegistryError> {
        let mut st = lock(&self.state);
        match st.roles.get(&role).and_then(|t| t.partition_num) {
            None => return Err(RegistryError::NotInitialized),
            Some(found) if found != from => {
                return Err(RegistryError::PartitionNumChanged {
                    role,
                    expected: from,
                    found,
                })
            }
            Some(_) => {}
        }
        st.ensure_partitions(role, to);
        st.role_tree(role).partition_num = Some(to);
        st.publish(role);
        Ok(())
    }

    pub(crate) fn register(
        &self,
        role: Role,
        partition: u32,
        info: NodeInfo,
    ) -> Result<Arc<RegInner>, RegistryError> {
        let mut st = lock(&self.state);
        if role.is_partitioned() && st.roles.get(&role).and_then(|t| t.partition_num).is_none() {
            return Err(RegistryError::NotInitialized);
        }
        let folder = st.role_tree(role).folders.entry(partition).or_default();
        let id = folder.next_seq;
        folder.next_seq += 1;
        folder.nodes.insert(id, info.clone());
        let reg = Arc::new(RegInner::new(role, partition, info));
        reg.set_node(format!("node-{id:010}"), id);
        st.publish(role);
        Ok(reg)
    }

    pub(crate) fn update(
        &self,
        reg: &RegInner,
        f: impl FnOnce(&mut NodeInfo),
    ) -> Result<(), RegistryError> {
        let mut st = lock(&self.state);
        if reg.is_dead() {
            return Err(RegistryError::Closed);
        }
        let info = {
            let mut info = lock(&reg.info);
            f(&mut info);
            info.clone()
        };
        let id = *reg.id_tx.borrow();
        if let Some(node) = st
            .roles
            .get_mut(&reg.role)
            .and_then(|t| t.folders.get_mut(&reg.partition))
            .and_then(|f| f.nodes.get_mut(&id))
        {
            *node = info;
        }
        st.publish(reg.role);
        Ok(())
    }

    pub(crate) fn deregister(&self, reg: &RegInner) {
        if reg.dead.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut st = lock(&self.state);
        let id = *reg.id_tx.borrow();
        if let Some(f) = st
            .roles
            .get_mut(&reg.role)
            .and_then(|t| t.folders.get_mut(&reg.partition))
        {
            f.nodes.remove(&id);
        }
        st.publish(reg.role);
    }

    pub(crate) fn watch(&self, role: Role) -> watch::Receiver<Arc<RoleView>> {
        let mut st = lock(&self.state);
        if let Some(tx) = st.views.get(&role) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(Arc::new(st.view(role)));
        st.views.insert(role, tx);
        rx
    }

    pub(crate) fn read(&self, role: Role) -> RoleView {
        lock(&self.state).view(role)
    }
}
