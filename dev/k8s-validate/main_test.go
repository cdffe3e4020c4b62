package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The manifests this validator guards; the tests break copies of them.
const deployDir = "../../deploy/kubernetes"

func TestTheDeployManifestsAreValid(t *testing.T) {
	names, problems := checkDir(newScheme(), deployDir, 30000)
	if len(problems) > 0 {
		t.Fatalf("problems in %s:\n%s", deployDir, strings.Join(problems, "\n"))
	}
	if len(names) < 3 {
		t.Fatalf("expected the Deployment, the Secret and the ConfigMap, got %v", names)
	}
}

// Each mutation is one mistake in one file of a copy of deploy/kubernetes; the validator must
// report it with a message containing want.
func TestEachMistakeInACopyOfTheManifestsIsReported(t *testing.T) {
	cases := []struct {
		name, file, old, new, want string
	}{
		{"misspelt field", "deployment.yaml", "livenessProbe:", "livenesProbe:",
			`unknown field "spec.template.spec.containers[1].livenesProbe"`},
		{"field in the wrong case", "deployment.yaml", "readOnlyRootFilesystem:", "ReadOnlyRootFilesystem:",
			`unknown field "spec.template.spec.containers[1].securityContext.ReadOnlyRootFilesystem"`},
		{"duplicate field", "deployment.yaml", "  replicas: 1\n", "  replicas: 1\n  replicas: 2\n",
			`mapping key "replicas" already defined`},
		{"string for an integer", "deployment.yaml", "  replicas: 1\n", "  replicas: \"1\"\n",
			`cannot unmarshal string into Go struct field DeploymentSpec.spec.replicas of type int32`},
		{"malformed quantity", "deployment.yaml", "memory: 384Mi", "memory: 384MB",
			`quantities must match the regular expression`},
		{"unknown apiVersion", "deployment.yaml", "apiVersion: apps/v1", "apiVersion: apps/v1beta1",
			`apiVersion "apps/v1beta1" kind "Deployment": no such type`},
		{"misspelt kustomization field", "kustomization.yaml", "resources:", "resource:",
			`kustomize: invalid Kustomization: json: unknown field "resource"`},
		{"selector that misses the template", "deployment.yaml", "    matchLabels:\n      app.kubernetes.io/name: user-service",
			"    matchLabels:\n      app.kubernetes.io/name: user-servic", `does not match the template's labels`},
		{"probe on an undeclared port name", "deployment.yaml", "              path: /ready\n              port: metrics",
			"              path: /ready\n              port: metric", `readinessProbe: port "metric" is not a named port`},
		{"request above its limit", "deployment.yaml", "memory: 128Mi", "memory: 512Mi",
			`the memory request 512Mi is above its limit 384Mi`},
		{"missing secret key", "deployment.yaml", "- key: kafka-password", "- key: kafka-pasword",
			`Secret "ecst-secrets" has no key "kafka-pasword"`},
		{"mount of a missing volume", "deployment.yaml", "- name: ecst-secrets\n              mountPath",
			"- name: ecst-secret\n              mountPath", `volumeMount "ecst-secret": no volume of that name`},
		{"grace period not above the shutdown deadline", "deployment.yaml", "terminationGracePeriodSeconds: 45",
			"terminationGracePeriodSeconds: 30", `terminationGracePeriodSeconds 30 s is not longer than shutdown_timeout_ms 30000`},
		{"grace period unset (30 s)", "deployment.yaml", "      terminationGracePeriodSeconds: 45\n", "",
			`terminationGracePeriodSeconds 30 s is not longer`},
		{"longer shutdown deadline", "connector.toml", "shutdown_timeout_ms = 30000", "shutdown_timeout_ms = 60000",
			`terminationGracePeriodSeconds 45 s is not longer than shutdown_timeout_ms 60000`},
		{"loopback metrics listener", "connector.toml", `listen = "0.0.0.0:9187"`, `listen = "127.0.0.1:9187"`,
			`metrics.listen "127.0.0.1:9187" is a loopback address`},
		{"metrics listener on another port", "connector.toml", `listen = "0.0.0.0:9187"`, `listen = "0.0.0.0:9188"`,
			`livenessProbe: port 9187, but metrics.listen is "0.0.0.0:9188"`},
		{"secret file outside every mount", "connector.toml", `"/run/secrets/ecst/kafka-password"`, `"/run/secret/ecst/kafka-password"`,
			`kafka.secret_files."sasl.password" = "/run/secret/ecst/kafka-password": no volumeMount`},
		{"secret file not in the Secret", "connector.toml", `/run/secrets/ecst/mongo-uri"`, `/run/secrets/ecst/mongo_uri"`,
			`has no file "mongo_uri"`},
		{"wrong probe path", "deployment.yaml", "path: /health", "path: /healthz",
			`livenessProbe: path "/healthz", ecst serves /health for it`},
		{"two replicas of the source", "deployment.yaml", "  replicas: 1\n", "  replicas: 2\n",
			`exactly 1 replica`},
		{"rolling update of the source", "deployment.yaml", "    type: Recreate", "    type: RollingUpdate",
			`strategy must be Recreate`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := copyDir(t, deployDir)
			p := filepath.Join(dir, tc.file)
			b, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			if n := strings.Count(string(b), tc.old); n != 1 {
				t.Fatalf("%s: %q occurs %d times, the mutation needs it once", tc.file, tc.old, n)
			}
			if err := os.WriteFile(p, []byte(strings.Replace(string(b), tc.old, tc.new, 1)), 0o644); err != nil {
				t.Fatal(err)
			}
			_, problems := checkDir(newScheme(), dir, 30000)
			for _, pr := range problems {
				if strings.Contains(pr, tc.want) {
					return
				}
			}
			t.Fatalf("want a problem containing %q, got:\n%s", tc.want, strings.Join(problems, "\n"))
		})
	}
}

func copyDir(t *testing.T, src string) string {
	t.Helper()
	dst := t.TempDir()
	entries, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.IsDir() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}
