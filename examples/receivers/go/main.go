// Command receiver is a CitaPro webhook receiver that uses only Go's standard library.
//
// Serve:
//
//	PORT=8000 WEBHOOK_SECRET=<secret> go run .
//
// Check the published test vectors (the default path is relative to this folder):
//
//	go run . verify [path/to/signature-test-vectors.json]
//
// The server accepts POST /webhook, verifies X-CitaPro-Signature over the raw
// body, responds with 204 to a valid delivery (also to a repeated delivery id)
// and with 401 to a missing or wrong signature. It prints one line per delivery.
package main

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"
)

const (
	maxBodyBytes       = 1 << 20
	defaultVectorsPath = "../../../docs/signature-test-vectors.json"
)

// signBody returns the X-CitaPro-Signature value for a body. The key is the
// secret string as given (64 hex characters), not the bytes that the hex
// digits would decode to.
func signBody(secret string, body []byte) string {
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write(body)
	return hex.EncodeToString(mac.Sum(nil))
}

func signStandard(secret, deliveryID string, timestamp int64, body []byte) string {
	mac := hmac.New(sha256.New, []byte(secret))
	fmt.Fprintf(mac, "%s.%d.", deliveryID, timestamp)
	mac.Write(body)
	return "v1," + base64.StdEncoding.EncodeToString(mac.Sum(nil))
}

// signatureMatches compares the received signature with the expected one in constant time.
func signatureMatches(secret string, body []byte, header string) bool {
	expected := []byte(signBody(secret, body))
	return hmac.Equal(expected, []byte(strings.TrimSpace(header)))
}

// deliveryLog contains the delivery ids already processed.
//
// NOTE: the ids live in memory only, so they are forgotten on restart and the
// map grows without bound. A production receiver stores them in its database
// with a unique key and removes old ones after a few days.
type deliveryLog struct {
	mu  sync.Mutex
	ids map[string]struct{}
}

// add records a delivery id and returns false if it was already recorded.
func (l *deliveryLog) add(id string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, seen := l.ids[id]; seen {
		return false
	}
	l.ids[id] = struct{}{}
	return true
}

type receiver struct {
	secret     string
	deliveries *deliveryLog
	out        *log.Logger
}

func (r *receiver) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	if req.URL.Path != "/webhook" {
		w.WriteHeader(http.StatusNotFound)
		return
	}
	if req.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		w.WriteHeader(http.StatusMethodNotAllowed)
		return
	}
	deliveryID := req.Header.Get("X-CitaPro-Delivery-Id")
	if deliveryID == "" {
		deliveryID = "-"
	}
	// The raw bytes are what was signed. Parse them only after verifying.
	body, err := io.ReadAll(http.MaxBytesReader(w, req.Body, maxBodyBytes))
	if err != nil {
		r.out.Printf("rejected delivery=%s: reading the body failed: %v", deliveryID, err)
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			w.WriteHeader(http.StatusRequestEntityTooLarge)
		} else {
			w.WriteHeader(http.StatusBadRequest)
		}
		return
	}
	if !signatureMatches(r.secret, body, req.Header.Get("X-CitaPro-Signature")) {
		r.out.Printf("rejected delivery=%s: invalid X-CitaPro-Signature", deliveryID)
		w.WriteHeader(http.StatusUnauthorized)
		return
	}
	var payload struct {
		Event string `json:"event"`
		Data  struct {
			// RawMessage keeps the changes exactly as sent, numbers included.
			Changes json.RawMessage `json:"changes"`
		} `json:"data"`
	}
	if err := json.Unmarshal(body, &payload); err != nil {
		r.out.Printf("rejected delivery=%s: body is not valid JSON: %v", deliveryID, err)
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	if !r.deliveries.add(deliveryID) {
		r.out.Printf("duplicate delivery=%s: already processed", deliveryID)
		w.WriteHeader(http.StatusNoContent)
		return
	}

	// Respond first, so the sender's 10 s timeout never runs out while the
	// work runs. A real receiver queues the payload here.
	w.WriteHeader(http.StatusNoContent)
	changes := "none"
	if len(payload.Data.Changes) > 0 {
		changes = string(payload.Data.Changes)
	}
	r.out.Printf("received %s delivery=%s changes=%s", payload.Event, deliveryID, changes)
}

func serve() int {
	secret := os.Getenv("WEBHOOK_SECRET")
	if secret == "" {
		fmt.Fprintln(os.Stderr, "WEBHOOK_SECRET is missing: set it to the secret returned by POST /v1/webhooks")
		return 2
	}
	host := os.Getenv("HOST")
	if host == "" {
		host = "127.0.0.1"
	}
	port := os.Getenv("PORT")
	if port == "" {
		port = "8000"
	}
	out := log.New(os.Stdout, "", 0)
	server := &http.Server{
		Addr: net.JoinHostPort(host, port),
		Handler: &receiver{
			secret:     secret,
			deliveries: &deliveryLog{ids: make(map[string]struct{})},
			out:        out,
		},
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
	}
	out.Printf("listening on http://%s/webhook", server.Addr)
	if err := server.ListenAndServe(); err != nil {
		fmt.Fprintf(os.Stderr, "server failed: %v\n", err)
		return 1
	}
	return 0
}

type testVector struct {
	Name              string `json:"name"`
	Secret            string `json:"secret"`
	Body              string `json:"body"`
	DeliveryID        string `json:"deliveryId"`
	Timestamp         int64  `json:"timestamp"`
	Signature         string `json:"signature"`
	StandardSignature string `json:"standardSignature"`
}

// verifyVectors checks every published test vector and returns the process exit status.
func verifyVectors(path string) int {
	text, err := os.ReadFile(path)
	if err != nil {
		fmt.Fprintf(os.Stderr, "cannot read the test vectors: %v\n", err)
		return 1
	}
	var cases []testVector
	decoder := json.NewDecoder(bytes.NewReader(text))
	decoder.DisallowUnknownFields()
	if err := decoder.Decode(&cases); err != nil {
		fmt.Fprintf(os.Stderr, "invalid test vector file %s: %v\n", path, err)
		return 1
	}
	failed := 0
	for _, c := range cases {
		body := []byte(c.Body)
		signature := signBody(c.Secret, body)
		standard := signStandard(c.Secret, c.DeliveryID, c.Timestamp, body)
		switch {
		case signature != c.Signature:
			failed++
			fmt.Printf("FAIL %s: signature %s, expected %s\n", c.Name, signature, c.Signature)
		case standard != c.StandardSignature:
			failed++
			fmt.Printf("FAIL %s: standard signature %s, expected %s\n", c.Name, standard, c.StandardSignature)
		case !signatureMatches(c.Secret, body, c.Signature):
			failed++
			fmt.Printf("FAIL %s: signatureMatches rejects the expected signature\n", c.Name)
		default:
			fmt.Printf("ok   %s\n", c.Name)
		}
	}
	fmt.Printf("go: %d of %d test vectors match\n", len(cases)-failed, len(cases))
	if failed > 0 || len(cases) == 0 {
		return 1
	}
	return 0
}

func main() {
	args := os.Args[1:]
	switch {
	case len(args) >= 1 && args[0] == "verify":
		path := defaultVectorsPath
		if len(args) > 1 {
			path = args[1]
		}
		os.Exit(verifyVectors(path))
	case len(args) == 0:
		os.Exit(serve())
	default:
		fmt.Fprintln(os.Stderr, "usage: receiver [verify [VECTORS_JSON]]")
		os.Exit(2)
	}
}
