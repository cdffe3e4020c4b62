// Command k8s-validate checks the Kubernetes manifests of deploy/ offline: no cluster, no schema
// download. `kubectl apply --dry-run=client` cannot do that (it asks the API server for its
// OpenAPI schema and its resource list), so this program does what that validation does, with
// the API types themselves:
//
//  1. It renders each kustomization directory with the kustomize library (the engine behind
//     `kubectl kustomize`), so generated objects and rewritten names are what gets checked.
//  2. It decodes every rendered object into its typed struct from k8s.io/api, strictly, as the
//     API server's strict field validation does: an unknown field (a misspelling such as
//     `livenesProbe`), a field in the wrong case, a duplicate field, a wrong type (a string for
//     an integer) or a malformed quantity (`128MB`) is an error. An apiVersion/kind that is not
//     among the registered API groups is an error too, not a skip.
//  3. It checks what the API server or the kubelet would refuse or trip over later: a selector
//     that does not match its template's labels, a volumeMount of a missing volume, a probe on
//     a port name the container does not declare, a request above its limit, a ConfigMap,
//     Secret or key that the rendered objects do not have.
//  4. For a container named `ecst`, it reads connector.toml from the ConfigMap mounted at the
//     path of its --config argument and checks the deployment against it: the grace period is
//     longer than shutdown_timeout_ms, metrics.listen is not a loopback address and the probes
//     (/health liveness, /ready readiness) use its port, every *_file secret path is mounted,
//     and a source runs in exactly one replica with the Recreate strategy. The rest of
//     connector.toml is checked by ecst's own parser, in src/config.rs's unit tests.
//
// Usage: k8s-validate [-default-shutdown-timeout-ms N] DIR... (exit status 1 on any problem).
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"path"
	"sort"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	sigsyaml "sigs.k8s.io/yaml"
)

// defaultGraceSeconds is Kubernetes' terminationGracePeriodSeconds when a pod sets none.
const defaultGraceSeconds = 30

// imageConfigPath is where the Dockerfile's ENTRYPOINT points ecst's --config.
const imageConfigPath = "/etc/ecst/connector.toml"

// defaultMetricsListen is ecst's DEFAULT_METRICS_LISTEN (src/config.rs).
const defaultMetricsListen = "127.0.0.1:9187"

func newScheme() *runtime.Scheme {
	s := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{
		corev1.AddToScheme, appsv1.AddToScheme, batchv1.AddToScheme, policyv1.AddToScheme,
		networkingv1.AddToScheme, rbacv1.AddToScheme, autoscalingv2.AddToScheme,
	} {
		if err := add(s); err != nil {
			panic(err) // the registration of k8s.io/api's own types cannot fail
		}
	}
	return s
}

func main() {
	defaultShutdown := flag.Int64("default-shutdown-timeout-ms", 30000,
		"ecst's DEFAULT_SHUTDOWN_TIMEOUT_MS (src/config.rs), for a connector.toml without shutdown_timeout_ms")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: k8s-validate [-default-shutdown-timeout-ms N] KUSTOMIZATION_DIR...")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() == 0 {
		flag.Usage()
		os.Exit(2)
	}
	scheme := newScheme()
	failed := false
	for _, dir := range flag.Args() {
		names, problems := checkDir(scheme, dir, *defaultShutdown)
		for _, p := range problems {
			fmt.Fprintf(os.Stderr, "%s: %s\n", dir, p)
		}
		if len(problems) > 0 {
			failed = true
			continue
		}
		fmt.Printf("%s: %d objects valid: %s\n", dir, len(names), strings.Join(names, ", "))
	}
	if failed {
		os.Exit(1)
	}
}

// rendered holds the typed objects of one kustomization, for the cross-object checks.
type rendered struct {
	configMaps map[string]*corev1.ConfigMap
	secrets    map[string]*corev1.Secret
}

func checkDir(scheme *runtime.Scheme, dir string, defaultShutdown int64) ([]string, []string) {
	resMap, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		return nil, []string{"kustomize: " + err.Error()}
	}
	var names, problems []string
	var objects []runtime.Object
	set := rendered{configMaps: map[string]*corev1.ConfigMap{}, secrets: map[string]*corev1.Secret{}}
	for _, r := range resMap.Resources() {
		id := r.GetKind() + "/" + r.GetName()
		names = append(names, id)
		y, err := r.AsYAML()
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: %v", id, err))
			continue
		}
		obj, errs := decodeStrict(scheme, y)
		for _, e := range errs {
			problems = append(problems, fmt.Sprintf("%s: %s", id, e))
		}
		if obj == nil {
			continue
		}
		objects = append(objects, obj)
		switch o := obj.(type) {
		case *corev1.ConfigMap:
			set.configMaps[o.Name] = o
		case *corev1.Secret:
			set.secrets[o.Name] = o
		}
	}
	for _, obj := range objects {
		problems = append(problems, checkObject(obj, set, defaultShutdown)...)
	}
	return names, problems
}

// decodeStrict decodes one object into its registered type and returns every strict error.
func decodeStrict(scheme *runtime.Scheme, y []byte) (runtime.Object, []string) {
	j, err := sigsyaml.YAMLToJSONStrict(y)
	if err != nil {
		return nil, []string{err.Error()}
	}
	var tm metav1.TypeMeta
	if err := json.Unmarshal(j, &tm); err != nil {
		return nil, []string{err.Error()}
	}
	gvk := schema.FromAPIVersionAndKind(tm.APIVersion, tm.Kind)
	obj, err := scheme.New(gvk)
	if err != nil {
		return nil, []string{fmt.Sprintf("apiVersion %q kind %q: no such type in the API groups this validator knows", tm.APIVersion, tm.Kind)}
	}
	strict, err := kjson.UnmarshalStrict(j, obj)
	if err != nil {
		return nil, []string{err.Error()}
	}
	var out []string
	for _, e := range strict {
		out = append(out, e.Error())
	}
	return obj, out
}

// workload is what the ecst checks need to know of the object that owns a pod template.
type workload struct {
	id       string
	replicas *int32 // nil: not a replicated workload (a Pod or a Job)
	recreate bool   // Deployment with strategy Recreate
}

func checkObject(obj runtime.Object, set rendered, defaultShutdown int64) []string {
	var w workload
	var sel *metav1.LabelSelector
	var tmpl *corev1.PodTemplateSpec
	switch o := obj.(type) {
	case *appsv1.Deployment:
		one := int32(1)
		w = workload{id: "Deployment/" + o.Name, replicas: &one, recreate: o.Spec.Strategy.Type == appsv1.RecreateDeploymentStrategyType}
		if o.Spec.Replicas != nil {
			w.replicas = o.Spec.Replicas
		}
		sel, tmpl = o.Spec.Selector, &o.Spec.Template
	case *appsv1.StatefulSet:
		one := int32(1)
		w = workload{id: "StatefulSet/" + o.Name, replicas: &one}
		if o.Spec.Replicas != nil {
			w.replicas = o.Spec.Replicas
		}
		sel, tmpl = o.Spec.Selector, &o.Spec.Template
	case *appsv1.DaemonSet:
		many := int32(2) // one per node
		w = workload{id: "DaemonSet/" + o.Name, replicas: &many}
		sel, tmpl = o.Spec.Selector, &o.Spec.Template
	case *batchv1.Job:
		w = workload{id: "Job/" + o.Name}
		tmpl = &o.Spec.Template
	case *corev1.Pod:
		w = workload{id: "Pod/" + o.Name}
		return checkPod(w, o.Spec, set, defaultShutdown)
	default:
		return nil
	}
	var problems []string
	if w.replicas != nil {
		if sel == nil {
			problems = append(problems, w.id+": spec.selector is required")
		} else if s, err := metav1.LabelSelectorAsSelector(sel); err != nil {
			problems = append(problems, fmt.Sprintf("%s: spec.selector: %v", w.id, err))
		} else if s.Empty() || !s.Matches(labels.Set(tmpl.Labels)) {
			problems = append(problems, fmt.Sprintf("%s: spec.selector %s does not match the template's labels %v", w.id, s, tmpl.Labels))
		}
	}
	return append(problems, checkPod(w, tmpl.Spec, set, defaultShutdown)...)
}

func checkPod(w workload, spec corev1.PodSpec, set rendered, defaultShutdown int64) []string {
	var problems []string
	bad := func(format string, args ...any) {
		problems = append(problems, w.id+": "+fmt.Sprintf(format, args...))
	}
	volumes := map[string]*corev1.Volume{}
	for i := range spec.Volumes {
		v := &spec.Volumes[i]
		if volumes[v.Name] != nil {
			bad("volume %q is declared twice", v.Name)
		}
		volumes[v.Name] = v
		if cm := v.ConfigMap; cm != nil {
			checkSource(bad, v.Name, "ConfigMap", cm.Name, cm.Optional, cm.Items, cm.DefaultMode, keysOfConfigMap(set.configMaps[cm.Name]))
		}
		if s := v.Secret; s != nil {
			checkSource(bad, v.Name, "Secret", s.SecretName, s.Optional, s.Items, s.DefaultMode, keysOfSecret(set.secrets[s.SecretName]))
		}
	}
	if len(spec.Containers) == 0 {
		bad("a pod needs at least one container")
	}
	seen := map[string]bool{}
	all := append(append([]corev1.Container{}, spec.InitContainers...), spec.Containers...)
	for i := range all {
		c := &all[i]
		where := fmt.Sprintf("container %q", c.Name)
		if errs := validation.IsDNS1123Label(c.Name); len(errs) > 0 {
			bad("%s: name: %s", where, strings.Join(errs, "; "))
		}
		if seen[c.Name] {
			bad("%s: the name is used twice", where)
		}
		seen[c.Name] = true
		if c.Image == "" {
			bad("%s: image is required", where)
		}
		for _, p := range c.Ports {
			if p.ContainerPort < 1 || p.ContainerPort > 65535 {
				bad("%s: containerPort %d is not in 1-65535", where, p.ContainerPort)
			}
			if p.Name != "" {
				if errs := validation.IsValidPortName(p.Name); len(errs) > 0 {
					bad("%s: port name %q: %s", where, p.Name, strings.Join(errs, "; "))
				}
			}
		}
		for _, m := range c.VolumeMounts {
			if volumes[m.Name] == nil {
				bad("%s: volumeMount %q: no volume of that name", where, m.Name)
			}
			if !path.IsAbs(m.MountPath) {
				bad("%s: volumeMount %q: mountPath %q is not absolute", where, m.Name, m.MountPath)
			}
		}
		for kind, p := range map[string]*corev1.Probe{"livenessProbe": c.LivenessProbe, "readinessProbe": c.ReadinessProbe, "startupProbe": c.StartupProbe} {
			if p == nil {
				continue
			}
			var port *intstr.IntOrString
			if p.HTTPGet != nil {
				port = &p.HTTPGet.Port
			} else if p.TCPSocket != nil {
				port = &p.TCPSocket.Port
			}
			if port != nil {
				if _, err := resolvePort(c, *port); err != nil {
					bad("%s: %s: %v", where, kind, err)
				}
			}
		}
		for name, limit := range c.Resources.Limits {
			if req, ok := c.Resources.Requests[name]; ok && req.Cmp(limit) > 0 {
				bad("%s: resources: the %s request %s is above its limit %s", where, name, req.String(), limit.String())
			}
		}
		if c.Name == "ecst" {
			problems = append(problems, checkEcst(w, spec, c, volumes, set, defaultShutdown)...)
		}
	}
	sort.Strings(problems) // the probe map's order is random
	return problems
}

func keysOfConfigMap(cm *corev1.ConfigMap) map[string]bool {
	if cm == nil {
		return nil
	}
	keys := map[string]bool{}
	for k := range cm.Data {
		keys[k] = true
	}
	for k := range cm.BinaryData {
		keys[k] = true
	}
	return keys
}

func keysOfSecret(s *corev1.Secret) map[string]bool {
	if s == nil {
		return nil
	}
	keys := map[string]bool{}
	for k := range s.Data {
		keys[k] = true
	}
	for k := range s.StringData {
		keys[k] = true
	}
	return keys
}

// checkSource checks a ConfigMap or Secret volume against the rendered objects (keys is nil when
// the object is missing).
func checkSource(bad func(string, ...any), volume, kind, name string, optional *bool, items []corev1.KeyToPath, mode *int32, keys map[string]bool) {
	if mode != nil && (*mode < 0 || *mode > 0o777) {
		bad("volume %q: defaultMode %#o is not in 0-0777", volume, *mode)
	}
	if optional != nil && *optional {
		return
	}
	if keys == nil {
		bad("volume %q: %s %q is not among the rendered objects", volume, kind, name)
		return
	}
	for _, it := range items {
		if !keys[it.Key] {
			bad("volume %q: %s %q has no key %q", volume, kind, name, it.Key)
		}
	}
}

func resolvePort(c *corev1.Container, p intstr.IntOrString) (int32, error) {
	if p.Type == intstr.String {
		for _, cp := range c.Ports {
			if cp.Name == p.StrVal {
				return cp.ContainerPort, nil
			}
		}
		return 0, fmt.Errorf("port %q is not a named port of the container", p.StrVal)
	}
	if p.IntVal < 1 || p.IntVal > 65535 {
		return 0, fmt.Errorf("port %d is not in 1-65535", p.IntVal)
	}
	return p.IntVal, nil
}

// ecstConfig is the part of connector.toml these checks read (ecst's parser checks the rest).
type ecstConfig struct {
	ShutdownTimeoutMs *int64 `toml:"shutdown_timeout_ms"`
	Mysql             struct {
		PasswordFile string `toml:"password_file"`
		CAFile       string `toml:"ca_file"`
	} `toml:"mysql"`
	SchemaRegistry struct {
		PasswordFile string `toml:"password_file"`
	} `toml:"schema_registry"`
	Mongo struct {
		URIFile string `toml:"uri_file"`
	} `toml:"mongo"`
	Kafka struct {
		SecretFiles map[string]string `toml:"secret_files"`
	} `toml:"kafka"`
	Metrics struct {
		Listen *string `toml:"listen"`
	} `toml:"metrics"`
}

func checkEcst(w workload, spec corev1.PodSpec, c *corev1.Container, volumes map[string]*corev1.Volume, set rendered, defaultShutdown int64) []string {
	var problems []string
	bad := func(format string, args ...any) {
		problems = append(problems, w.id+`: container "ecst": `+fmt.Sprintf(format, args...))
	}
	cfgPath := imageConfigPath
	args := append(append([]string{}, c.Command...), c.Args...)
	for i, a := range args {
		if (a == "--config" || a == "-c") && i+1 < len(args) {
			cfgPath = args[i+1]
		} else if v, ok := strings.CutPrefix(a, "--config="); ok {
			cfgPath = v
		}
	}
	text, err := fileIn(c, volumes, set, cfgPath)
	if err != nil {
		bad("--config %s: %v", cfgPath, err)
		return problems
	}
	var cfg ecstConfig
	meta, err := toml.Decode(text, &cfg)
	if err != nil {
		bad("%s: %v", cfgPath, err)
		return problems
	}

	shutdown := defaultShutdown
	if cfg.ShutdownTimeoutMs != nil {
		shutdown = *cfg.ShutdownTimeoutMs
	}
	grace := int64(defaultGraceSeconds)
	if spec.TerminationGracePeriodSeconds != nil {
		grace = *spec.TerminationGracePeriodSeconds
	}
	if grace*1000 <= shutdown {
		bad("terminationGracePeriodSeconds %d s is not longer than shutdown_timeout_ms %d: the kubelet would SIGKILL ecst while it drains", grace, shutdown)
	}

	listen := defaultMetricsListen
	if cfg.Metrics.Listen != nil {
		listen = *cfg.Metrics.Listen
	}
	listenPort := int32(0)
	if host, port, err := net.SplitHostPort(listen); err != nil {
		bad("metrics.listen %q: %v (the probes need the endpoint)", listen, err)
	} else {
		if ip := net.ParseIP(host); host == "localhost" || (ip != nil && ip.IsLoopback()) {
			bad("metrics.listen %q is a loopback address: the kubelet probes the pod's IP", listen)
		}
		if n, err := strconv.ParseInt(port, 10, 32); err == nil {
			listenPort = int32(n)
		}
	}
	for _, probe := range []struct {
		kind, path string
		p          *corev1.Probe
	}{{"livenessProbe", "/health", c.LivenessProbe}, {"readinessProbe", "/ready", c.ReadinessProbe}} {
		if probe.p == nil || probe.p.HTTPGet == nil {
			bad("%s: an httpGet probe of %s is required", probe.kind, probe.path)
			continue
		}
		if probe.p.HTTPGet.Path != probe.path {
			bad("%s: path %q, ecst serves %s for it", probe.kind, probe.p.HTTPGet.Path, probe.path)
		}
		if port, err := resolvePort(c, probe.p.HTTPGet.Port); err == nil && listenPort != 0 && port != listenPort {
			bad("%s: port %d, but metrics.listen is %q", probe.kind, port, listen)
		}
	}

	secretFiles := map[string]string{
		"mysql.password_file":           cfg.Mysql.PasswordFile,
		"mysql.ca_file":                 cfg.Mysql.CAFile,
		"schema_registry.password_file": cfg.SchemaRegistry.PasswordFile,
		"mongo.uri_file":                cfg.Mongo.URIFile,
	}
	for k, f := range cfg.Kafka.SecretFiles {
		secretFiles[fmt.Sprintf("kafka.secret_files.%q", k)] = f
	}
	for field, f := range secretFiles {
		if f == "" {
			continue
		}
		if _, err := fileIn(c, volumes, set, f); err != nil {
			bad("%s = %q: %v", field, f, err)
		}
	}

	if meta.IsDefined("source") {
		if w.replicas == nil || *w.replicas != 1 {
			bad("[source] is configured: the source is a single writer, so its workload needs exactly 1 replica")
		}
		if strings.HasPrefix(w.id, "Deployment/") && !w.recreate {
			bad("[source] is configured: strategy must be Recreate, a rolling update runs two sources at once")
		}
	}
	return problems
}

// fileIn returns the content that `file` has inside container c, from the ConfigMap or Secret
// volume mounted over it.
func fileIn(c *corev1.Container, volumes map[string]*corev1.Volume, set rendered, file string) (string, error) {
	var mount *corev1.VolumeMount
	for i := range c.VolumeMounts {
		m := &c.VolumeMounts[i]
		if (file == m.MountPath || strings.HasPrefix(file, strings.TrimSuffix(m.MountPath, "/")+"/")) &&
			(mount == nil || len(m.MountPath) > len(mount.MountPath)) {
			mount = m
		}
	}
	if mount == nil {
		return "", fmt.Errorf("no volumeMount of the container holds it")
	}
	v := volumes[mount.Name]
	if v == nil {
		return "", fmt.Errorf("volumeMount %q has no volume", mount.Name)
	}
	rel := strings.TrimPrefix(strings.TrimPrefix(file, mount.MountPath), "/")
	if mount.SubPath != "" {
		rel = path.Join(mount.SubPath, rel)
	}
	key := func(items []corev1.KeyToPath) (string, bool) {
		if len(items) == 0 {
			return rel, true
		}
		for _, it := range items {
			if it.Path == rel {
				return it.Key, true
			}
		}
		return "", false
	}
	switch {
	case v.ConfigMap != nil:
		cm := set.configMaps[v.ConfigMap.Name]
		k, ok := key(v.ConfigMap.Items)
		if cm == nil || !ok {
			return "", fmt.Errorf("volume %q (ConfigMap %q) has no file %q", v.Name, v.ConfigMap.Name, rel)
		}
		if s, ok := cm.Data[k]; ok {
			return s, nil
		}
		if b, ok := cm.BinaryData[k]; ok {
			return string(b), nil
		}
		return "", fmt.Errorf("ConfigMap %q has no key %q", cm.Name, k)
	case v.Secret != nil:
		s := set.secrets[v.Secret.SecretName]
		k, ok := key(v.Secret.Items)
		if s == nil || !ok {
			return "", fmt.Errorf("volume %q (Secret %q) has no file %q", v.Name, v.Secret.SecretName, rel)
		}
		if b, ok := s.Data[k]; ok {
			return string(b), nil
		}
		if t, ok := s.StringData[k]; ok {
			return t, nil
		}
		return "", fmt.Errorf("Secret %q has no key %q", s.Name, k)
	default:
		return "", fmt.Errorf("volume %q is neither a ConfigMap nor a Secret, so its files cannot be checked", v.Name)
	}
}
