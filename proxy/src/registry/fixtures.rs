//! A cluster as users write it, for the tests of every module that reads a snapshot: two nodes
//! with addresses and one without, enrolled `front` and `back`, unenrolled `legacy`, Services
//! with named and numbered target ports, and the pods that make the corner cases (not ready,
//! host network, finished, on the node without an address).
//!
//! - node-a (172.30.0.11): front/client (sa client, 10.244.1.2), back/web-1 (app=web, sa web,
//!   10.244.1.3, http=9080), back/agent (host network), back/job (Succeeded, 10.244.1.9),
//!   legacy/batch (app=batch, 10.244.1.4)
//! - node-b (172.30.0.12): back/web-0 (app=web, sa web, 10.244.2.2, http=8080), back/web-2
//!   (app=web, not ready)
//! - node-c (no address): back/lonely (app=lonely, 10.244.3.2)
//! - Services: back/web 10.96.0.10:80 → http, back/nobody 10.96.0.11 (no pod matches),
//!   back/manual 10.96.0.12 (no selector), legacy/batch 10.96.0.20:80 → 7070,
//!   back/lonely 10.96.0.30:80 → 8080

pub const CLUSTER: &str = "\
apiVersion: v1
kind: Node
metadata: {name: node-a}
status: {addresses: [{type: InternalIP, address: 172.30.0.11}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-b}
status: {addresses: [{type: InternalIP, address: 172.30.0.12}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-c}
---
apiVersion: v1
kind: Namespace
metadata: {name: front, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: back, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {namespace: front, name: client, uid: u-client}
spec: {nodeName: node-a, serviceAccountName: client}
status: {podIP: 10.244.1.2, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {namespace: back, name: web-0, uid: u-web0, labels: {app: web}}
spec:
  nodeName: node-b
  serviceAccountName: web
  containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.244.2.2, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {namespace: back, name: web-1, uid: u-web1, labels: {app: web}}
spec:
  nodeName: node-a
  serviceAccountName: web
  containers: [{name: c, ports: [{name: http, containerPort: 9080}]}]
status: {podIP: 10.244.1.3, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {namespace: back, name: web-2, uid: u-web2, labels: {app: web}}
spec: {nodeName: node-b, serviceAccountName: web}
status:
  podIP: 10.244.2.9
  phase: Running
  conditions: [{type: Ready, status: 'False'}]
---
apiVersion: v1
kind: Pod
metadata: {namespace: back, name: lonely, uid: u-lonely, labels: {app: lonely}}
spec: {nodeName: node-c}
status: {podIP: 10.244.3.2, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {namespace: back, name: agent, uid: u-agent}
spec: {nodeName: node-a, hostNetwork: true}
status: {podIP: 172.30.0.11, phase: Running}
---
apiVersion: v1
kind: Pod
metadata: {namespace: back, name: job, uid: u-job}
spec: {nodeName: node-a}
status: {podIP: 10.244.1.9, phase: Succeeded}
---
apiVersion: v1
kind: Pod
metadata: {namespace: legacy, name: batch, uid: u-batch, labels: {app: batch}}
spec: {nodeName: node-a}
status: {podIP: 10.244.1.4, phase: Running}
---
apiVersion: v1
kind: Service
metadata: {namespace: back, name: web}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {namespace: back, name: nobody}
spec:
  clusterIP: 10.96.0.11
  selector: {app: nothing-has-this}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {namespace: back, name: manual}
spec:
  clusterIP: 10.96.0.12
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {namespace: legacy, name: batch}
spec:
  clusterIP: 10.96.0.20
  selector: {app: batch}
  ports: [{port: 80, targetPort: 7070}]
---
apiVersion: v1
kind: Service
metadata: {namespace: back, name: lonely}
spec:
  clusterIP: 10.96.0.30
  selector: {app: lonely}
  ports: [{port: 80, targetPort: 8080}]
";
